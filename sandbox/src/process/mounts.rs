//! Realising a [`SandboxView`] as mounts inside the sandbox's private mount namespace.
//!
//! Layout while building: `/` is a scratch tmpfs, the host root sits at `/oldroot` (every
//! host source path is read through it) and the sandbox's root is a tmpfs at `/newroot`.
//! Host paths were canonicalised by the policy resolver, so an absolute symlink swapped
//! in afterwards resolves inside the scratch tmpfs and fails instead of escaping.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use crate::view::{MountOp, SandboxView};

pub(crate) const OLDROOT: &str = "/oldroot";
pub(crate) const NEWROOT: &str = "/newroot";

/// A failed mount step, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub(crate) struct MountError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn err(what: &'static str, path: &Path) -> MountError {
    MountError {
        what,
        path: path.to_path_buf(),
        source: std::io::Error::last_os_error(),
    }
}

fn cstr(p: &Path) -> Result<CString, MountError> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| MountError {
        what: "path contains NUL",
        path: p.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), MountError> {
    vmm::jail::mount(src, dst, fstype, flags, data).map_err(|source| MountError {
        what: "mount",
        path: dst.to_path_buf(),
        source,
    })
}

/// Make the mount at `path` (and, with `recursive`, everything below it) read-only.
pub(crate) fn make_readonly(path: &Path, recursive: bool) -> Result<(), MountError> {
    let c = cstr(path)?;
    let mut attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr reads the path and the attr struct of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags as libc::c_uint,
            &mut attr as *mut libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(err("make read-only", path));
    }
    Ok(())
}

/// `mkdir -p` for the sandbox's own tmpfs trees: one `mkdir` when the parent exists
/// (the usual case), ancestors only on ENOENT, and an existing directory is fine. What
/// exists but is not a directory fails at the next step that needs one.
fn mkdir_p(path: &Path) -> Result<(), MountError> {
    match std::fs::DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| *p != path) {
                mkdir_p(parent)?;
            }
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|source| MountError {
                    what: "mkdir",
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(source) => Err(MountError {
            what: "mkdir",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The directories under the sandbox's root known to exist, so that building the root
/// asks the kernel for each one once (most steps share a parent: /etc, /dev).
#[derive(Default)]
struct Dirs(HashSet<PathBuf>);

impl Dirs {
    /// `mkdir -p`, unless `path` is known to exist.
    fn ensure(&mut self, path: &Path) -> Result<(), MountError> {
        if self.0.contains(path) {
            return Ok(());
        }
        mkdir_p(path)?;
        for dir in path.ancestors() {
            if !self.0.insert(dir.to_path_buf()) {
                break;
            }
        }
        Ok(())
    }

    /// `ensure` for the parent of `path`.
    fn ensure_parent(&mut self, path: &Path) -> Result<(), MountError> {
        match path.parent() {
            Some(parent) => self.ensure(parent),
            None => Ok(()),
        }
    }

    /// Something was mounted at `path`: what was below it is not known any more.
    fn mounted(&mut self, path: &Path) {
        self.0.retain(|d| d == path || !d.starts_with(path));
    }
}

/// Create an empty file to bind over, unless something is there already (a symlink
/// included, which is not followed).
fn touch(dirs: &mut Dirs, path: &Path) -> Result<(), MountError> {
    dirs.ensure_parent(path)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(MountError {
            what: "create mount point",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn under(root: &str, p: &Path) -> PathBuf {
    Path::new(root).join(p.strip_prefix("/").unwrap_or(p))
}

/// Step 1 (in the init, before forking PID 1): private propagation, scratch root,
/// host root moved to /oldroot, sandbox root tmpfs at /newroot.
pub(crate) fn enter_scratch_root() -> Result<(), MountError> {
    vmm::jail::make_all_private().map_err(|source| MountError {
        what: "make private the mounts under",
        path: PathBuf::from("/"),
        source,
    })?;
    let base = ["/tmp", "/run", "/mnt", "/var/tmp"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or(MountError {
            what: "no directory for the scratch root",
            path: PathBuf::from("/tmp"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        })?;
    mount(
        Some(Path::new("tmpfs")),
        base,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    std::env::set_current_dir(base).map_err(|source| MountError {
        what: "chdir",
        path: base.to_path_buf(),
        source,
    })?;
    mkdir_p(Path::new("oldroot"))?;
    mkdir_p(Path::new("newroot"))?;
    pivot_root(Path::new("."), Path::new("oldroot"))?;
    std::env::set_current_dir("/").map_err(|source| MountError {
        what: "chdir",
        path: PathBuf::from("/"),
        source,
    })?;
    mount(
        Some(Path::new("tmpfs")),
        Path::new(NEWROOT),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )
}

pub(crate) fn pivot_root(new_root: &Path, put_old: &Path) -> Result<(), MountError> {
    let n = cstr(new_root)?;
    let o = cstr(put_old)?;
    // SAFETY: both are NUL-terminated strings that outlive the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) } != 0 {
        return Err(err("pivot_root", new_root));
    }
    Ok(())
}

/// Step 2 (in the init): realise every op except /proc under /newroot, then make the
/// masks and the root itself read-only.
pub(crate) fn build_root(view: &SandboxView) -> Result<(), MountError> {
    let mut masks = Vec::new();
    let mut dirs = Dirs::default();
    // SAFETY: umask only swaps the process's mask; the old one is put back at once.
    let umask = unsafe {
        let old = libc::umask(0);
        libc::umask(old);
        old
    };
    for op in &view.ops {
        match op {
            MountOp::Bind {
                src,
                dst,
                readonly: true,
                dir: false,
            } if dst.starts_with("/etc") => {
                // A copy on the /etc tmpfs (made read-only below) costs less than a bind
                // mount and its mount point, and keeps the mount table short.
                let target = under(NEWROOT, dst);
                dirs.ensure_parent(&target)?;
                copy_file(&under(OLDROOT, src), &target, umask)?;
            }
            MountOp::Bind {
                src,
                dst,
                readonly,
                dir,
            } => {
                let target = under(NEWROOT, dst);
                if *dir {
                    dirs.ensure(&target)?;
                } else {
                    touch(&mut dirs, &target)?;
                }
                let source = under(OLDROOT, src);
                mount(
                    Some(&source),
                    &target,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                )?;
                dirs.mounted(&target);
                if *readonly {
                    make_readonly(&target, true)?;
                }
            }
            MountOp::Mask { dst, dir } => {
                let target = under(NEWROOT, dst);
                if *dir {
                    mount(
                        Some(Path::new("tmpfs")),
                        &target,
                        Some("tmpfs"),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        Some("mode=0000,size=4k"),
                    )?;
                    dirs.mounted(&target);
                    masks.push(target);
                } else {
                    mount(
                        Some(&under(OLDROOT, Path::new("/dev/null"))),
                        &target,
                        None,
                        libc::MS_BIND,
                        None,
                    )?;
                    make_readonly(&target, false)?;
                }
            }
            MountOp::Symlink { target, dst } => {
                let at = under(NEWROOT, dst);
                dirs.ensure_parent(&at)?;
                symlink(target, &at).map_err(|source| MountError {
                    what: "symlink",
                    path: at.clone(),
                    source,
                })?;
            }
            MountOp::Tmpfs {
                dst,
                mode,
                readonly,
                size,
            } => {
                let target = under(NEWROOT, dst);
                if *readonly {
                    masks.push(target.clone());
                }
                dirs.ensure(&target)?;
                mount(
                    Some(Path::new("tmpfs")),
                    &target,
                    Some("tmpfs"),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    Some(&match size {
                        Some(bytes) => format!("mode={mode:o},size={bytes}"),
                        None => format!("mode={mode:o}"),
                    }),
                )?;
                dirs.mounted(&target);
            }
            MountOp::File { dst, contents } => {
                let at = under(NEWROOT, dst);
                dirs.ensure_parent(&at)?;
                std::fs::write(&at, contents).map_err(|source| MountError {
                    what: "write",
                    path: at.clone(),
                    source,
                })?;
            }
            MountOp::Dev => build_dev(&mut dirs)?,
            MountOp::Proc => dirs.ensure(&under(NEWROOT, Path::new("/proc")))?,
        }
    }
    // Masks and read-only tmpfs mounts (/etc) become read-only once populated.
    for m in masks {
        make_readonly(&m, false)?;
    }
    make_readonly(Path::new(NEWROOT), false)
}

/// Copy a (small, host-owned) file onto the sandbox's tmpfs with its permission bits:
/// sendfile from the host file to the new one (`std::fs::copy` first tries
/// copy_file_range, which never works from the host's file system to a tmpfs, and
/// sets the mode separately); the mode is given at creation, and set again only where
/// `umask` (the process's) took bits from it.
fn copy_file(src: &Path, dst: &Path, umask: libc::mode_t) -> Result<(), MountError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    fn failed<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> MountError + 'a {
        move |source| MountError {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
    let from = std::fs::File::open(src).map_err(failed("open", src))?;
    let meta = from.metadata().map_err(failed("stat", src))?;
    let mode = meta.mode() & 0o7777;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)
        .map_err(failed("copy", dst))?;
    let mut left = meta.len();
    while left > 0 {
        // SAFETY: sendfile between two descriptors we own, from the source's offset.
        let sent = unsafe {
            libc::sendfile(
                to.as_raw_fd(),
                from.as_raw_fd(),
                std::ptr::null_mut(),
                usize::try_from(left).unwrap_or(usize::MAX),
            )
        };
        match sent {
            n if n > 0 => left = left.saturating_sub(n as u64),
            0 => break,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(failed("copy", dst)(e));
                }
            }
        }
    }
    // Exactly the host file's bits, whatever the umask.
    if mode & umask != 0 {
        to.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(failed("copy", dst))?;
    }
    Ok(())
}

/// A minimal /dev: a tmpfs with the harmless character devices bound from the host.
fn build_dev(dirs: &mut Dirs) -> Result<(), MountError> {
    let dev = under(NEWROOT, Path::new("/dev"));
    dirs.ensure(&dev)?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755"),
    )?;
    dirs.mounted(&dev);
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        touch(dirs, &target)?;
        mount(
            Some(&under(OLDROOT, &Path::new("/dev").join(name))),
            &target,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        symlink(target, dev.join(name)).map_err(|source| MountError {
            what: "symlink",
            path: dev.join(name),
            source,
        })?;
    }
    let shm = dev.join("shm");
    dirs.ensure(&shm)?;
    mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    let pts = dev.join("pts");
    dirs.ensure(&pts)?;
    // A private devpts instance; without it programs simply have no pseudo-terminals.
    let _ = mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    );
    Ok(())
}

/// Step 3 (in PID 1 of the new PID namespace): a fresh /proc, then pivot into /newroot
/// and detach everything else.
pub(crate) fn finish_root() -> Result<(), MountError> {
    let proc_dir = under(NEWROOT, Path::new("/proc"));
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    std::env::set_current_dir(NEWROOT).map_err(|source| MountError {
        what: "chdir",
        path: PathBuf::from(NEWROOT),
        source,
    })?;
    pivot_root(Path::new("."), Path::new("."))?;
    let dot = cstr(Path::new("."))?;
    // SAFETY: NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(err("detach the host root", Path::new("/")));
    }
    std::env::set_current_dir("/").map_err(|source| MountError {
        what: "chdir",
        path: PathBuf::from("/"),
        source,
    })
}

//! The VMM's jail: before it has a thread or a guest, a VMM run as root moves into a
//! mount namespace of its own whose root is an empty, read-only tmpfs holding only what
//! its VM needs, each bound at the path the configuration names: the hypervisor's device
//! file, the kernel and initramfs (read-only), the runtime directory, the snapshot
//! directory, each shared directory (read-only where the share is), and `/proc/self`
//! (the VMM's own process directory: its descriptors, as fuse-backend-rs reopens files
//! through them, and its mount table). Nothing else of the host's file system exists for
//! it afterwards: a VMM taken over by its guest finds no `/etc`, no `/home`, no other
//! process's `/proc` entry, and cannot mount (its seccomp filter refuses it).
//!
//! A VMM whose shares are chosen after it starts (a warm pool's, `control_socket`) gets
//! [`slot_path`] directories instead; its parent mounts each share there when it hands
//! the VM out ([`inject_share`]), from outside the jail.
//!
//! The steps (all before the VMM's seccomp filter, which refuses `mount`):
//! `unshare(CLONE_NEWNS)`, open every source (`O_PATH`, in the host's view), make every
//! mount private, mount the tmpfs on the jail directory, create each mount point and bind
//! its source there (mount points are created and opened beneath the new root without
//! following symbolic links), remount the read-only ones, remount the root read-only,
//! `pivot_root` into it and detach the old root.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::config::{ConsoleMode, SnapshotMode, VmConfig};

/// Where the jail of a VM whose shares come later keeps its share slots.
pub const SLOTS_DIR: &str = "/.mxc-slots";

/// The directory in the jail where share slot `index` of a warm-pool VM is mounted.
pub fn slot_path(index: usize) -> PathBuf {
    Path::new(SLOTS_DIR).join(index.to_string())
}

/// Errors while the VMM jails itself, each naming the path or the step.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: cannot {what} {}", path.display())]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("jail: cannot {what}")]
    Step {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("jail: {} is not an absolute path without `..`", .0.display())]
    BadPath(PathBuf),
}

/// How the VMM may use a bound path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    ReadOnly,
    ReadWrite,
    /// A device file, bound as it is (its own mount's flags; no `nodev`).
    Device,
}

/// One host path the jailed VMM sees, at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub access: Access,
    /// With the mounts beneath it (a share shows what the host shows there; the share's
    /// filter hides mount points by name).
    pub recursive: bool,
}

/// What the VM of `config` needs to see, besides `/proc/self`: `dirs` (its runtime
/// directory, where its report, log, sockets and console live; read-write) and every
/// path the configuration names. One entry per path (the widest access asked for it), parents
/// before the paths inside them.
pub fn plan(config: &VmConfig, dirs: &[&Path]) -> Vec<Bind> {
    let mut binds = Vec::new();
    let mut add = |path: &Path, access: Access, recursive: bool| {
        binds.push(Bind {
            path: path.to_path_buf(),
            access,
            recursive,
        })
    };
    for dir in dirs {
        add(dir, Access::ReadWrite, false);
    }
    for device in crate::hypervisor::device_paths() {
        add(Path::new(device), Access::Device, false);
    }
    add(&config.kernel, Access::ReadOnly, false);
    if let Some(initrd) = &config.initrd {
        add(initrd, Access::ReadOnly, false);
    }
    let parent = |p: &Path| p.parent().map(Path::to_path_buf);
    if let ConsoleMode::File(path) = &config.console {
        if let Some(dir) = parent(path) {
            add(&dir, Access::ReadWrite, false);
        }
    }
    if let Some(vsock) = &config.vsock {
        if let Some(dir) = parent(&vsock.uds_path) {
            add(&dir, Access::ReadWrite, false);
        }
    }
    if let Some(dir) = config.control_socket.as_deref().and_then(parent) {
        add(&dir, Access::ReadWrite, false);
    }
    match &config.snapshot {
        Some(SnapshotMode::SaveAtReady(dir) | SnapshotMode::Restore(dir)) => {
            add(dir, Access::ReadWrite, false)
        }
        None => {}
    }
    for share in &config.shares {
        let access = if share.readonly {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        add(&share.host_path, access, true);
    }
    if let Some(placeholder) = &config.share_placeholder {
        add(placeholder, Access::ReadOnly, false);
    }
    binds.sort_by(|a, b| {
        let depth = |p: &Path| p.components().count();
        (depth(&a.path), &a.path).cmp(&(depth(&b.path), &b.path))
    });
    // One entry per path: the widest access and recursion asked for it.
    binds.dedup_by(|later, kept| {
        if later.path != kept.path {
            return false;
        }
        kept.access = kept.access.max(later.access);
        kept.recursive |= later.recursive;
        true
    });
    binds
}

/// Jail this process (see the module's documentation) with `root` as the mount point of
/// its new root (an empty directory of the host; the host's view of it stays empty),
/// binding `binds` and `/proc/self`, and `slots` empty share-slot directories. Call before
/// the process has a second thread. Needs CAP_SYS_ADMIN.
pub fn enter(root: &Path, binds: &[Bind], slots: usize) -> Result<(), JailError> {
    // What the VMM learns from /sys once per process, it learns now.
    let _ = crate::hypervisor::host_flavour();
    // `/proc/self` opens as this process's own `/proc/<pid>`, which is bound.
    let proc_self = Bind {
        path: PathBuf::from("/proc/self"),
        access: Access::ReadOnly,
        recursive: false,
    };
    let binds: Vec<&Bind> = binds.iter().chain(std::iter::once(&proc_self)).collect();
    for bind in &binds {
        if !bind.path.is_absolute()
            || bind
                .path
                .components()
                .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(JailError::BadPath(bind.path.clone()));
        }
    }
    // A read-write directory the VM will write into first (the directory it saves its
    // snapshot in) is made now, as the VMM would make it (0700).
    for bind in binds.iter().filter(|b| b.access == Access::ReadWrite) {
        use std::os::unix::fs::DirBuilderExt;
        if !bind.path.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&bind.path)
                .map_err(path_error("create", &bind.path))?;
        }
    }
    // SAFETY: unshare() takes flags and touches no memory.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(step_error("leave the host's mount namespace"));
    }
    // Sources are opened in the host's view (copied into the new namespace: a bind's
    // source must be a mount of the caller's namespace) before anything changes.
    let sources = binds
        .iter()
        .map(|b| open_path(AT_FDCWD, &b.path, 0).map_err(path_error("open", &b.path)))
        .collect::<Result<Vec<_>, _>>()?;
    // Nothing mounted from here on travels back to the host's namespace.
    make_all_private().map_err(path_error("make private the mounts under", Path::new("/")))?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=1024"),
    )
    .map_err(path_error("mount the jail's root on", root))?;
    let new_root = open_path(AT_FDCWD, root, libc::O_DIRECTORY)
        .map_err(path_error("open the jail's root", root))?;

    for (bind, source) in binds.iter().zip(&sources) {
        let is_dir = is_directory(source).map_err(path_error("inspect", &bind.path))?;
        let target = mount_point(&new_root, &bind.path, is_dir)
            .map_err(path_error("make the jail's mount point for", &bind.path))?;
        let mut flags = libc::MS_BIND;
        if bind.recursive {
            flags |= libc::MS_REC;
        }
        mount(Some(&fd_path(source)), &fd_path(&target), None, flags, None)
            .map_err(path_error("bind into the jail", &bind.path))?;
        let restrict = match bind.access {
            Access::Device => None,
            Access::ReadWrite => Some(libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC),
            Access::ReadOnly => {
                Some(libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY)
            }
        };
        if let Some(extra) = restrict {
            // The mount just made (the target descriptor names what lies beneath it).
            let top = beneath(&new_root, &bind.path, libc::O_PATH)
                .map_err(path_error("open in the jail", &bind.path))?;
            mount(
                None,
                &fd_path(&top),
                None,
                libc::MS_REMOUNT | libc::MS_BIND | extra,
                None,
            )
            .map_err(path_error("restrict in the jail", &bind.path))?;
        }
    }
    for index in 0..slots {
        mount_point(&new_root, &slot_path(index), true)
            .map_err(path_error("make the share slot", &slot_path(index)))?;
    }
    drop(sources);

    mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(path_error("make read-only the jail's root", root))?;
    // SAFETY: fchdir() on a descriptor we own.
    if unsafe { libc::fchdir(new_root.as_raw_fd()) } != 0 {
        return Err(step_error("enter the jail's root"));
    }
    let dot = c".";
    // SAFETY: pivot_root() reads two NUL-terminated strings that outlive the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(step_error("pivot_root into the jail"));
    }
    // The old root now lies beneath the new one at "."; detach it.
    // SAFETY: umount2() reads a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(step_error("detach the host's root"));
    }
    // SAFETY: chdir() reads a NUL-terminated string that outlives the call.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(step_error("enter the jail's root"));
    }
    Ok(())
}

/// Mount `source` (a host directory, with the mounts beneath it; read-only, `nosuid`,
/// `nodev`, `noexec` with `read_only`, else only the last three) at `target` in the mount
/// namespace of the jailed VMM `pid`, which must be this process's child (so its pid
/// cannot have been reused): a warm-pool VM's share slot ([`slot_path`]). The copy of
/// `source` is made here; a short-lived thread of this process, with a file-system
/// context of its own, enters the VMM's namespace and attaches it. Needs CAP_SYS_ADMIN.
pub fn inject_share(
    pid: u32,
    source: &Path,
    target: &Path,
    read_only: bool,
) -> Result<(), JailError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).map_err(path_error(
        "open the mount namespace of",
        &PathBuf::from(format!("/proc/{pid}")),
    ))?;
    let c = cstring(source).map_err(path_error("open", source))?;
    // SAFETY: open_tree() reads a NUL-terminated string that outlives the call.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            AT_FDCWD,
            c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(path_error("copy the mounts of", source)(
            io::Error::last_os_error(),
        ));
    }
    let tree = RawFd::try_from(tree).map_err(|_| JailError::BadPath(source.to_path_buf()))?;
    // SAFETY: open_tree() returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree) };
    let mut attr: libc::mount_attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    if read_only {
        attr.attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    let empty = c"";
    // SAFETY: mount_setattr() reads the empty path and the mount_attr of the size passed,
    // which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(path_error("restrict the copy of", source)(
            io::Error::last_os_error(),
        ));
    }
    let to = cstring(target).map_err(path_error("mount on", target))?;
    let attach = move || -> io::Result<()> {
        // SAFETY: unshare() takes flags; this thread alone gets its own root and working
        // directory, so that it may enter another mount namespace.
        if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: setns() on a descriptor we own; it changes only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: move_mount() reads two NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                AT_FDCWD,
                to.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    std::thread::Builder::new()
        .name("mxc-jail-share".into())
        .spawn(attach)
        .map_err(path_error("start a thread to mount on", target))?
        .join()
        .map_err(|_| JailError::Step {
            what: "mount a share slot (the thread panicked)",
            source: io::Error::other("panic"),
        })?
        .map_err(path_error("mount a share slot at", target))
}

const AT_FDCWD: RawFd = libc::AT_FDCWD;

fn path_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Path { what, path, source }
}

fn step_error(what: &'static str) -> JailError {
    JailError::Step {
        what,
        source: io::Error::last_os_error(),
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: a path the kernel resolves to what `fd` names (mount(2) follows it).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// An `O_PATH` descriptor of `path` (relative to `dir`), following symbolic links.
fn open_path(dir: RawFd, path: &Path, extra: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: openat() reads a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat() returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open `path` (absolute, meaning beneath `root`) with `openat2`: never leaving `root`,
/// following no symbolic link.
fn beneath(root: &OwnedFd, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = cstring(rel)?;
    // SAFETY: an all-zero open_how is valid (no flags, no mode, no resolve flags).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2() reads the NUL-terminated path and the open_how, which outlive
    // the call, and is told the open_how's size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: openat2() returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_directory(fd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: an all-zero stat is a valid value for fstat() to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat() writes into the stat we pass.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// Make `path` exist beneath `root` (its missing directories, then a directory or an
/// empty file), without following a symbolic link, and open it `O_PATH`. A part that
/// exists already (the content of a bind made before, which shows the host's) is used
/// as it is.
fn mount_point(root: &OwnedFd, path: &Path, is_dir: bool) -> io::Result<OwnedFd> {
    let names: Vec<&std::ffi::OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect();
    let mut so_far = PathBuf::from("/");
    for (i, name) in names.iter().enumerate() {
        let dir = beneath(root, &so_far, libc::O_PATH | libc::O_DIRECTORY)?;
        let c = cstring(Path::new(name))?;
        let last = i + 1 == names.len();
        let made = if last && !is_dir {
            // SAFETY: openat() reads a NUL-terminated string that outlives the call.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd >= 0 {
                // SAFETY: a descriptor openat() just returned, closed once.
                unsafe { libc::close(fd) };
            }
            fd >= 0
        } else {
            // SAFETY: mkdirat() reads a NUL-terminated string that outlives the call.
            unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) == 0 }
        };
        if !made {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EEXIST) {
                return Err(error);
            }
        }
        so_far.push(name);
    }
    beneath(root, &so_far, libc::O_PATH)
}

/// Make every mount of this mount namespace private: nothing mounted or unmounted in it
/// from now on propagates to the namespace it was copied from, or back.
pub fn make_all_private() -> io::Result<()> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
}

/// `mount(2)` (the process tier's mounts use it too).
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let target = cstring(target)?;
    let fstype = fstype
        .map(|t| CString::new(t).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let data = data
        .map(|d| CString::new(d).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: mount() reads NUL-terminated strings (or nulls) that outlive the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fs::FsShareConfig;

    fn share(path: &str, readonly: bool) -> FsShareConfig {
        FsShareConfig {
            tag: "mxcfs0".into(),
            host_path: path.into(),
            guest_path: path.into(),
            readonly,
            denied: vec![format!("{path}/secret").into()],
            root_allowlist: None,
        }
    }

    #[test]
    fn the_plan_binds_what_the_vm_names_once_each_parents_first() {
        let mut config = VmConfig::new("/cache/kernel/vmlinux", 256, 1);
        config.initrd = Some("/cache/initramfs.cpio".into());
        config.console = ConsoleMode::File("/run/vm/console.log".into());
        config.vsock = Some(crate::config::VsockConfig {
            guest_cid: 3,
            uds_path: "/run/vm/vsock.sock".into(),
        });
        config.snapshot = Some(SnapshotMode::Restore("/cache/snapshots/a".into()));
        config.shares = vec![
            share("/usr", true),
            share("/work/project", false),
            // The same directory twice: read-write wins.
            share("/work/project", true),
            share("/work/project/docs", true),
        ];
        let plan = plan(&config, &[Path::new("/run/vm"), Path::new("/run/vm")]);
        let got: Vec<(&str, Access, bool)> = plan
            .iter()
            .map(|b| (b.path.to_str().unwrap_or(""), b.access, b.recursive))
            .collect();
        assert_eq!(
            got,
            [
                ("/usr", Access::ReadOnly, true),
                ("/cache/initramfs.cpio", Access::ReadOnly, false),
                ("/dev/kvm", Access::Device, false),
                ("/run/vm", Access::ReadWrite, false),
                ("/work/project", Access::ReadWrite, true),
                ("/cache/kernel/vmlinux", Access::ReadOnly, false),
                ("/cache/snapshots/a", Access::ReadWrite, false),
                ("/work/project/docs", Access::ReadOnly, true),
            ]
        );
    }

    #[test]
    fn a_path_with_dot_dot_or_relative_is_refused_before_anything_changes() {
        for path in ["relative/dir", "/a/../etc"] {
            let bind = Bind {
                path: path.into(),
                access: Access::ReadOnly,
                recursive: false,
            };
            let err = enter(Path::new("/nonexistent"), &[bind], 0).unwrap_err();
            assert!(matches!(err, JailError::BadPath(_)), "{err}");
        }
    }
}

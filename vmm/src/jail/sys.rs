//! The system calls the jail is made of, each with its `// SAFETY:` once: the classic
//! `mount(2)`, and the mount API that works on descriptors (`open_tree`, `mount_setattr`,
//! `move_mount`, `fsopen`/`fsmount`), through which a mount is copied in one mount
//! namespace and attached in another, and never at a path a link could redirect.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

pub(super) const AT_FDCWD: RawFd = libc::AT_FDCWD;

/// `nosuid,nodev,noexec`: what every bind of the jail but the device file carries.
pub(super) const RESTRICTED: u64 =
    libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;
/// [`RESTRICTED`] and read-only.
pub(super) const READ_ONLY: u64 = RESTRICTED | libc::MOUNT_ATTR_RDONLY;

pub(super) fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The descriptor a system call returned (`ret` ≥ 0), owned; or the error it set.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the call returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn done(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `/proc/self/fd/N`: a path the kernel resolves to what `fd` names (mount(2) follows it).
pub(super) fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// An `O_PATH` descriptor of `path` (relative to `dir`), following symbolic links.
pub(super) fn open_path(dir: RawFd, path: &Path, extra: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: openat() reads a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
    owned(fd.into())
}

/// Open `path` (absolute, meaning beneath `root`, or relative to it) with `openat2`:
/// never leaving `root`, following no symbolic link.
pub(super) fn beneath(root: &OwnedFd, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
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
    owned(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })
}

/// `fstat(2)` of a descriptor.
pub(super) fn stat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value for fstat() to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat() writes into the stat we pass.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

pub(super) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// A detached copy of the mount at `path` (relative to `dir`; with the mounts beneath it
/// when `recursive`; a final symbolic link not followed with `nofollow`).
pub(super) fn clone_tree(
    dir: RawFd,
    path: &Path,
    recursive: bool,
    nofollow: bool,
) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    if nofollow {
        flags |= libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
    }
    // SAFETY: open_tree() reads a NUL-terminated string that outlives the call.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, dir, c.as_ptr(), flags) })
}

/// Set `attrs` (`MOUNT_ATTR_*`) on the mount `tree` names (and every mount beneath it
/// with `recursive`), and make it private.
pub(super) fn set_attr(tree: &OwnedFd, attrs: u64, recursive: bool) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr() reads the empty path and the mount_attr of the size passed,
    // which outlive the call.
    done(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
}

/// Attach the mount `tree` (detached, or attached elsewhere) on what `target` names.
pub(super) fn move_mount(tree: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    let empty = c"";
    // SAFETY: move_mount() reads two NUL-terminated strings that outlive the call.
    done(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
}

/// A new, detached tmpfs with `options` (`key=value`, comma-separated) and `attrs`.
pub(super) fn tmpfs(options: &str, attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: fsopen() reads a NUL-terminated string that outlives the call.
    let fs =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), libc::FSOPEN_CLOEXEC) })?;
    for option in options.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let key = CString::new(key).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let value = CString::new(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fsconfig() reads two NUL-terminated strings that outlive the call.
        done(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                libc::FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })?;
    }
    // SAFETY: fsconfig() with a command and no strings.
    done(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    let attrs =
        libc::c_uint::try_from(attrs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fsmount() takes a descriptor we own and flags.
    owned(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs,
        )
    })
}

/// Make `name` in the directory `dir` (a directory, or an empty file), unless it exists,
/// and open it `O_PATH` without following a link.
pub(super) fn make_at(dir: &OwnedFd, name: &Path, is_dir: bool) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    let made = if is_dir {
        // SAFETY: mkdirat() reads a NUL-terminated string that outlives the call.
        unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) == 0 }
    } else {
        // SAFETY: openat() reads a NUL-terminated string that outlives the call.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            false
        } else {
            // SAFETY: a descriptor openat() just returned, closed once.
            unsafe { libc::close(fd) };
            true
        }
    };
    if !made {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(error);
        }
    }
    beneath(dir, name, libc::O_PATH)
}

/// Make `path` exist beneath `root` (its missing directories, then a directory or an
/// empty file), without following a symbolic link, and open it `O_PATH`. A part that
/// exists already (the content of a bind made before, which shows the host's) is used
/// as it is.
pub(super) fn mount_point(root: &OwnedFd, path: &Path, is_dir: bool) -> io::Result<OwnedFd> {
    let names: Vec<&std::ffi::OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect();
    let mut dir = beneath(root, Path::new("/"), libc::O_PATH | libc::O_DIRECTORY)?;
    let mut so_far = PathBuf::from("/");
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        make_at(&dir, Path::new(name), !last || is_dir)?;
        so_far.push(name);
        if last {
            break;
        }
        // Reopened from the root: the walk sees what is mounted on the directory made.
        dir = beneath(root, &so_far, libc::O_PATH | libc::O_DIRECTORY)?;
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

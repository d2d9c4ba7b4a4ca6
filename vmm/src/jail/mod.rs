//! The VMM's jail: before it has a thread or a guest, a VMM run as root moves into a
//! mount namespace of its own whose root is an empty, read-only tmpfs holding only what
//! its VM needs, each bound at the path the configuration names: the hypervisor's device
//! file, the kernel and initramfs (read-only), the runtime directory, the snapshot
//! directory, each shared directory as its guest may see it (read-only where the share
//! is; an allowlisted root with only its allowed entries, denied paths covered:
//! [`ShareView`]), and `/proc/self` (the VMM's own process directory: its descriptors,
//! as fuse-backend-rs reopens files through them, and its mount table). Nothing else of
//! the host's file system exists for it afterwards: a VMM taken over by its guest finds
//! no `/home`, no `/etc/shadow`, no other process's `/proc` entry, and cannot mount (its
//! seccomp filter refuses it).
//!
//! A VMM whose shares are chosen after it starts (a warm pool's, `control_socket`) gets
//! [`slot_path`] directories instead; its parent mounts each share there when it hands
//! the VM out ([`inject_share`]), from outside the jail.
//!
//! The steps (all before the VMM's seccomp filter, which refuses `mount`):
//! `unshare(CLONE_NEWNS)`, make every mount private, open every bind's source in the
//! host's view (`O_PATH`; a share's view is copied with `open_tree`), mount the tmpfs on
//! the jail directory, create each mount point and bind or attach its source there
//! (mount points are created and opened beneath the new root without following symbolic
//! links), restrict each with `mount_setattr` (`nosuid,nodev,noexec`, and read-only where
//! asked, on every mount beneath a share), cover the denied paths, remount the root
//! read-only, `pivot_root` into it and detach the old root.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use crate::config::{ConsoleMode, SnapshotMode, VmConfig};
use crate::devices::fs::FsShareConfig;

mod sys;
mod view;

pub use sys::{make_all_private, mount};
pub use view::ShareView;

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
    /// For a share: what of it the jail shows (what its guest may see).
    pub view: Option<ShareView>,
}

/// What the jail covered of the share at `path`: the host inodes `(st_dev, st_ino)` its
/// guest must not see by another name (`FsShareConfig::hidden_inodes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Covered {
    pub path: PathBuf,
    pub inodes: Vec<(u64, u64)>,
}

/// What the VM of `config` needs to see, besides `/proc/self`: `dirs` (its runtime
/// directory, where its report, log, sockets and console live; read-write) and every
/// path the configuration names, each share as its guest may see it. One entry per path
/// (the widest access and view asked for it), parents before the paths inside them; no
/// share covers a denied path that another entry lies in.
pub fn plan(config: &VmConfig, dirs: &[&Path]) -> Vec<Bind> {
    let mut binds = Vec::new();
    let mut add = |path: &Path, access: Access, view: Option<ShareView>| {
        binds.push(Bind {
            path: path.to_path_buf(),
            access,
            recursive: view.is_some(),
            view,
        })
    };
    for dir in dirs {
        add(dir, Access::ReadWrite, None);
    }
    for device in crate::hypervisor::device_paths() {
        add(Path::new(device), Access::Device, None);
    }
    add(&config.kernel, Access::ReadOnly, None);
    if let Some(initrd) = &config.initrd {
        add(initrd, Access::ReadOnly, None);
    }
    let parent = |p: &Path| p.parent().map(Path::to_path_buf);
    if let ConsoleMode::File(path) = &config.console {
        if let Some(dir) = parent(path) {
            add(&dir, Access::ReadWrite, None);
        }
    }
    if let Some(vsock) = &config.vsock {
        if let Some(dir) = parent(&vsock.uds_path) {
            add(&dir, Access::ReadWrite, None);
        }
    }
    if let Some(dir) = config.control_socket.as_deref().and_then(parent) {
        add(&dir, Access::ReadWrite, None);
    }
    match &config.snapshot {
        Some(SnapshotMode::SaveAtReady(dir)) => add(dir, Access::ReadWrite, None),
        // Read-only: every later VM restores from it too, so a VMM taken over by its
        // guest must not change it (its parent records the memory's check instead:
        // `snapshot::verify_memory`).
        Some(SnapshotMode::Restore(dir)) => add(dir, Access::ReadOnly, None),
        None => {}
    }
    for share in &config.shares {
        let access = if share.readonly {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        add(&share.host_path, access, Some(ShareView::of(share)));
    }
    if let Some(placeholder) = &config.share_placeholder {
        add(placeholder, Access::ReadOnly, None);
    }
    binds.sort_by(|a, b| {
        let depth = |p: &Path| p.components().count();
        (depth(&a.path), &a.path).cmp(&(depth(&b.path), &b.path))
    });
    // One entry per path: the widest access, recursion and view asked for it.
    binds.dedup_by(|later, kept| {
        if later.path != kept.path {
            return false;
        }
        kept.access = kept.access.max(later.access);
        kept.recursive |= later.recursive;
        match (&mut kept.view, &later.view) {
            (Some(mine), Some(theirs)) => mine.widen(theirs),
            _ => kept.view = None,
        }
        true
    });
    // A denied path that holds another entry is left uncovered: the VM needs that entry
    // (the share's filter still hides the denied path from the guest).
    let paths: Vec<PathBuf> = binds.iter().map(|b| b.path.clone()).collect();
    for bind in &mut binds {
        let root = bind.path.clone();
        if let Some(view) = &mut bind.view {
            view.masked
                .retain(|rel| !paths.iter().any(|p| p.starts_with(root.join(rel))));
        }
    }
    binds
}

/// Jail this process (see the module's documentation) with `root` as the mount point of
/// its new root (an empty directory of the host; the host's view of it stays empty),
/// binding `binds` and `/proc/self`, and `slots` empty share-slot directories. Call before
/// the process has a second thread. Needs CAP_SYS_ADMIN. Returns what it covered of each
/// share.
pub fn enter(root: &Path, binds: &[Bind], slots: usize) -> Result<Vec<Covered>, JailError> {
    // What the VMM learns from /sys once per process, it learns now.
    let _ = crate::hypervisor::host_flavour();
    // `/proc/self` opens as this process's own `/proc/<pid>`, which is bound.
    let proc_self = Bind {
        path: PathBuf::from("/proc/self"),
        access: Access::ReadOnly,
        recursive: false,
        view: None,
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
    make_writable_dirs(binds.iter().copied())?;
    // SAFETY: unshare() takes flags and touches no memory.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(step_error("leave the host's mount namespace"));
    }
    // Nothing mounted from here on travels back to the host's namespace.
    make_all_private().map_err(path_error("make private the mounts under", Path::new("/")))?;
    // Every bind is copied in the host's view before anything changes.
    let copies = binds
        .iter()
        .map(|b| view::detach(b, false))
        .collect::<Result<Vec<_>, _>>()?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=1024"),
    )
    .map_err(path_error("mount the jail's root on", root))?;
    let new_root = sys::open_path(sys::AT_FDCWD, root, libc::O_DIRECTORY)
        .map_err(path_error("open the jail's root", root))?;
    for (bind, copy) in binds.iter().zip(&copies) {
        let target = sys::mount_point(&new_root, &bind.path, copy.is_dir())
            .map_err(path_error("make the jail's mount point for", &bind.path))?;
        copy.attach(&target, || {
            sys::beneath(&new_root, &bind.path, libc::O_PATH)
        })
        .map_err(path_error("bind into the jail", &bind.path))?;
    }
    for (bind, copy) in binds.iter().zip(&copies) {
        copy.attach_masks()
            .map_err(path_error("cover the denied paths of", &bind.path))?;
    }
    for index in 0..slots {
        sys::mount_point(&new_root, &slot_path(index), true)
            .map_err(path_error("make the share slot", &slot_path(index)))?;
    }
    let hidden = binds
        .iter()
        .zip(&copies)
        .filter(|(bind, _)| bind.view.is_some())
        .map(|(bind, copy)| Covered {
            path: bind.path.clone(),
            inodes: copy.hidden_inodes(),
        })
        .collect();
    drop(copies);

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
    Ok(hidden)
}

/// Make each read-write directory of `binds` the VM will write into first and that does
/// not exist yet (the directory it saves its snapshot in), as the VMM would make it
/// (0700): it is bound, or granted, before the VM runs.
pub fn make_writable_dirs<'a>(binds: impl IntoIterator<Item = &'a Bind>) -> Result<(), JailError> {
    use std::os::unix::fs::DirBuilderExt;
    for bind in binds.into_iter().filter(|b| b.access == Access::ReadWrite) {
        if !bind.path.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&bind.path)
                .map_err(path_error("create", &bind.path))?;
        }
    }
    Ok(())
}

/// Mount `share` (its host directory, as its guest may see it: [`ShareView`]; read-only,
/// `nosuid`, `nodev`, `noexec` where the share is read-only, else only the last three) at
/// `target` in the mount namespace of the jailed VMM `pid`, which must be this process's
/// child (so its pid cannot have been reused): a warm-pool VM's share slot
/// ([`slot_path`]). The copy is made here; a short-lived thread of this process, with a
/// file-system context of its own, enters the VMM's namespace and attaches it. Needs
/// CAP_SYS_ADMIN. Returns the inodes the view covers (`FsShareConfig::hidden_inodes`).
pub fn inject_share(
    pid: u32,
    share: &FsShareConfig,
    target: &Path,
) -> Result<Vec<(u64, u64)>, JailError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).map_err(path_error(
        "open the mount namespace of",
        &PathBuf::from(format!("/proc/{pid}")),
    ))?;
    let bind = Bind {
        path: share.host_path.clone(),
        access: if share.readonly {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        },
        recursive: true,
        view: Some(ShareView::of(share)),
    };
    let copy = view::detach(&bind, true)?;
    let hidden = copy.hidden_inodes();
    let to = target.to_path_buf();
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
        // Entering the namespace moved this thread to its root: the jail's.
        let jail = sys::open_path(sys::AT_FDCWD, Path::new("/"), libc::O_DIRECTORY)?;
        let slot = sys::beneath(&jail, &to, libc::O_PATH | libc::O_DIRECTORY)?;
        copy.attach(&slot, || sys::beneath(&jail, &to, libc::O_PATH))?;
        copy.attach_masks()
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
        .map_err(path_error("mount a share slot at", target))?;
    Ok(hidden)
}

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
            hidden_inodes: Vec::new(),
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
                ("/cache/snapshots/a", Access::ReadOnly, false),
                ("/work/project/docs", Access::ReadOnly, true),
            ]
        );
    }

    #[test]
    fn a_share_is_planned_as_its_guest_sees_it() {
        let mut config = VmConfig::new("/cache/vmlinux", 256, 1);
        let mut etc = share("/etc", true);
        etc.root_allowlist = Some(vec!["passwd".into(), "ssl".into()]);
        etc.denied = vec!["/etc/shadow".into(), "/etc/ssl/private".into()];
        let mut work = share("/work", false);
        work.denied = vec![
            "/work/secret".into(),
            "/work/keys".into(),
            "/work/cache".into(),
            // Not inside the share: nothing of it to cover.
            "/elsewhere/x".into(),
        ];
        // The same directory again, denying less: only what both deny is covered.
        let mut again = share("/work", true);
        again.denied = vec!["/work/secret".into(), "/work/keys".into()];
        // A share inside a denied path: that path stays uncovered (the VM needs the
        // share; the filter still hides it from the guest).
        let inner = share("/work/keys/public", true);
        config.shares = vec![etc, work, again, inner];

        let plan = plan(&config, &[Path::new("/run/vm")]);
        let view = |path: &str| {
            plan.iter()
                .find(|b| b.path == Path::new(path))
                .and_then(|b| b.view.clone())
                .unwrap()
        };

        assert_eq!(
            view("/etc"),
            ShareView {
                only: Some(vec!["passwd".into(), "ssl".into()]),
                masked: vec!["shadow".into(), "ssl/private".into()],
            }
        );
        assert_eq!(view("/work").only, None);
        assert_eq!(view("/work").masked, [PathBuf::from("secret")]);
        assert_eq!(view("/work/keys/public").masked, [PathBuf::from("secret")]);
        assert!(plan.iter().all(|b| b.view.is_some() == b.recursive));
    }

    #[test]
    fn a_path_with_dot_dot_or_relative_is_refused_before_anything_changes() {
        for path in ["relative/dir", "/a/../etc"] {
            let bind = Bind {
                path: path.into(),
                access: Access::ReadOnly,
                recursive: false,
                view: None,
            };
            let err = enter(Path::new("/nonexistent"), &[bind], 0).unwrap_err();
            assert!(matches!(err, JailError::BadPath(_)), "{err}");
        }
    }
}

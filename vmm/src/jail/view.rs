//! One bind of the jail, copied in the host's view and attached in the jail's: a plain
//! bind (the device file, the runtime directory, the kernel) or a share as the guest may
//! see it. A VMM taken over by its guest gets no more of a share than its guest may
//! read: a share with a root allowlist (the host's `/etc`) is a small read-only tmpfs
//! holding only the allowed entries (each bound, or its symbolic link copied), and each
//! denied path that exists is covered by an empty read-only mount (a tmpfs for a
//! directory, `/dev/null` without device access for anything else).
//!
//! The inodes a view covers (the other entries of an allowlisted root, each denied path
//! and the files with more than one link inside a denied directory) are what the share's
//! filter would have denied by inode had it seen them: they go back to the share's
//! configuration (`FsShareConfig::hidden_inodes`), so a hard link to one of them
//! elsewhere in the share stays hidden from the guest.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use super::sys::{self, AT_FDCWD, READ_ONLY, RESTRICTED};
use super::{path_error, Access, Bind, JailError};
use crate::devices::fs::share::{collect_linked_files, InodeId};
use crate::devices::fs::FsShareConfig;

/// What of a shared directory the jail shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShareView {
    /// Only these names directly under the root (the share's root allowlist); `None`:
    /// every entry.
    pub only: Option<Vec<String>>,
    /// Paths relative to the root to cover with an empty mount (the share's denied paths).
    pub masked: Vec<PathBuf>,
}

impl ShareView {
    /// The view of `share`: its root allowlist, its denied paths inside it.
    pub fn of(share: &FsShareConfig) -> Self {
        let masked = share
            .denied
            .iter()
            .filter_map(|path| path.strip_prefix(&share.host_path).ok())
            .filter(|rel| {
                rel.components().next().is_some()
                    && rel.components().all(|c| matches!(c, Component::Normal(_)))
            })
            .map(Path::to_path_buf)
            .collect();
        Self {
            only: share.root_allowlist.clone(),
            masked,
        }
    }

    /// The view of two shares of one directory: what either shows.
    pub(super) fn widen(&mut self, other: &ShareView) {
        self.only = match (self.only.take(), &other.only) {
            (Some(mut mine), Some(theirs)) => {
                mine.extend(
                    theirs
                        .iter()
                        .filter(|n| !mine.contains(n))
                        .cloned()
                        .collect::<Vec<_>>(),
                );
                Some(mine)
            }
            _ => None,
        };
        self.masked.retain(|path| other.masked.contains(path));
    }
}

/// An entry of an allowlisted root, ready to put into the jail's copy of it.
enum Entry {
    /// A directory or a file: a copy (another namespace) or the entry itself (`O_PATH`,
    /// bound in this one).
    Mount {
        source: OwnedFd,
        copied: bool,
        is_dir: bool,
    },
    Link(OsString),
}

/// How a bind reaches the jail.
enum Source {
    /// A detached copy (`open_tree`), attached with `move_mount`: what a share's view is
    /// made of, and every bind into another process's namespace.
    Tree(OwnedFd),
    /// The host path itself (`O_PATH`), bound with `mount(2)` and then restricted: a plain
    /// bind in this process's own new namespace (no copy, whose anonymous namespace
    /// costs more, ~0.05 ms a bind under kvm_pvm).
    Path {
        fd: OwnedFd,
        recursive: bool,
        attrs: u64,
    },
}

/// One bind, copied in the host's view, not yet attached ([`Detached::attach`]).
pub(super) struct Detached {
    source: Source,
    is_dir: bool,
    /// For an allowlisted root (`source` is then an empty tmpfs): its entries, by name.
    entries: Option<Vec<(OsString, Entry)>>,
    /// Empty mounts, and the paths relative to the root they cover.
    masks: Vec<(PathBuf, OwnedFd)>,
    /// What the view covers (see the module's documentation).
    hidden: HashSet<InodeId>,
}

fn attrs(access: Access) -> u64 {
    match access {
        Access::Device => 0,
        Access::ReadWrite => RESTRICTED,
        Access::ReadOnly => READ_ONLY,
    }
}

fn id(st: &libc::stat) -> InodeId {
    InodeId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// The denied path `rel` beneath `root` (`O_PATH`, no link followed), or `None` where
/// there is nothing to cover: it does not exist, or it is a link (denied as itself, it
/// shows no data).
fn covered(root: &OwnedFd, rel: &Path) -> io::Result<Option<OwnedFd>> {
    match sys::beneath(root, rel, libc::O_PATH) {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Take `bind` as the process now sees it (the host's view): a share's view is copied
/// (`open_tree`); a plain bind is only opened, unless `copy_always` (it is attached in
/// another namespace).
pub(super) fn detach(bind: &Bind, copy_always: bool) -> Result<Detached, JailError> {
    let path = &bind.path;
    let attrs = attrs(bind.access);
    let copy = |dir: libc::c_int, name: &Path, recursive: bool, nofollow: bool| {
        let tree = sys::clone_tree(dir, name, recursive, nofollow)?;
        sys::set_attr(&tree, attrs, recursive)?;
        Ok::<_, io::Error>(tree)
    };
    let mut hidden = HashSet::new();
    let (source, is_dir, entries) = match bind.view.as_ref().and_then(|v| v.only.as_ref()) {
        None if !copy_always && bind.view.is_none() => {
            let fd = sys::open_path(AT_FDCWD, path, 0).map_err(path_error("open", path))?;
            let is_dir = sys::is_dir(&sys::stat(&fd).map_err(path_error("inspect", path))?);
            let source = Source::Path {
                fd,
                recursive: bind.recursive,
                attrs,
            };
            (source, is_dir, None)
        }
        None => {
            let tree = copy(AT_FDCWD, path, bind.recursive, false)
                .map_err(path_error("copy the mount of", path))?;
            let is_dir = sys::is_dir(&sys::stat(&tree).map_err(path_error("inspect", path))?);
            (Source::Tree(tree), is_dir, None)
        }
        Some(only) => {
            let dir = sys::open_path(AT_FDCWD, path, libc::O_DIRECTORY)
                .map_err(path_error("open", path))?;
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(path).map_err(path_error("list", path))? {
                let entry = entry.map_err(path_error("list", path))?;
                let name = entry.file_name();
                let at = path.join(&name);
                // The entry itself, not what a link names (one fstatat).
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(path_error("inspect", &at)(e)),
                };
                let allowed = only.iter().any(|n| n.as_bytes() == name.as_bytes());
                let kind = meta.file_type();
                let entry = match () {
                    _ if !allowed => None,
                    _ if kind.is_dir() || kind.is_file() => {
                        let name = Path::new(&name);
                        let source = if copy_always {
                            // Restricted with the whole copy once it is attached.
                            sys::clone_tree(dir.as_raw_fd(), name, true, true)
                        } else {
                            sys::open_path(dir.as_raw_fd(), name, libc::O_NOFOLLOW)
                        }
                        .map_err(path_error("copy the mount of", &at))?;
                        Some(Entry::Mount {
                            source,
                            copied: copy_always,
                            is_dir: kind.is_dir(),
                        })
                    }
                    _ if kind.is_symlink() => Some(Entry::Link(
                        std::fs::read_link(&at)
                            .map_err(path_error("read the link", &at))?
                            .into_os_string(),
                    )),
                    _ => None,
                };
                match entry {
                    Some(entry) => entries.push((name, entry)),
                    None => {
                        hidden.insert(InodeId::of(&meta));
                    }
                }
            }
            let tree = sys::tmpfs("mode=0755,size=16k,nr_inodes=256", RESTRICTED)
                .map_err(path_error("make the jail's copy of", path))?;
            (Source::Tree(tree), true, Some(entries))
        }
    };
    let mut masks = Vec::new();
    if let Some(view) = &bind.view {
        let root =
            sys::open_path(AT_FDCWD, path, libc::O_DIRECTORY).map_err(path_error("open", path))?;
        for rel in &view.masked {
            let at = path.join(rel);
            let shown = |only: &Vec<String>| {
                rel.components().next().is_some_and(|first| {
                    only.iter()
                        .any(|n| n.as_bytes() == first.as_os_str().as_bytes())
                })
            };
            if view.only.as_ref().is_some_and(|only| !shown(only)) {
                // Not in the jail at all (and hidden above, if it exists).
                continue;
            }
            let Some(fd) = covered(&root, rel).map_err(path_error("open the denied path", &at))?
            else {
                continue;
            };
            let st = sys::stat(&fd).map_err(path_error("inspect", &at))?;
            hidden.insert(id(&st));
            let mask = if sys::is_dir(&st) {
                collect_linked_files(&mut hidden, &at, st.st_dev).map_err(|e| {
                    path_error("walk the denied directory", &at)(io::Error::other(e))
                })?;
                sys::tmpfs("mode=0555,size=4k,nr_inodes=2", READ_ONLY)
            } else {
                sys::clone_tree(AT_FDCWD, Path::new("/dev/null"), false, false)
                    .and_then(|tree| sys::set_attr(&tree, READ_ONLY, false).map(|()| tree))
            }
            .map_err(path_error("make the cover of", &at))?;
            masks.push((rel.clone(), mask));
        }
    }
    Ok(Detached {
        source,
        is_dir,
        entries,
        masks,
        hidden,
    })
}

impl Detached {
    /// Whether the copy is of a directory (its mount point must be one).
    pub(super) fn is_dir(&self) -> bool {
        self.is_dir
    }

    /// Attach the copy on `target` (in the mount namespace this thread is in; `mounted`
    /// opens what is then mounted there), with the entries of an allowlisted root; then
    /// make such a root read-only.
    pub(super) fn attach(
        &self,
        target: &OwnedFd,
        mounted: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> io::Result<()> {
        let tree = match &self.source {
            Source::Path {
                fd,
                recursive,
                attrs,
            } => {
                let mut flags = libc::MS_BIND;
                if *recursive {
                    flags |= libc::MS_REC;
                }
                sys::mount(
                    Some(&sys::fd_path(fd)),
                    &sys::fd_path(target),
                    None,
                    flags,
                    None,
                )?;
                return sys::set_attr(&mounted()?, *attrs, *recursive);
            }
            Source::Tree(tree) => tree,
        };
        sys::move_mount(tree, target)?;
        let Some(entries) = &self.entries else {
            return Ok(());
        };
        for (name, entry) in entries {
            match entry {
                Entry::Mount {
                    source,
                    copied,
                    is_dir,
                } => {
                    let point = sys::make_at(tree, Path::new(name), *is_dir)?;
                    if *copied {
                        sys::move_mount(source, &point)?;
                    } else {
                        sys::mount(
                            Some(&sys::fd_path(source)),
                            &sys::fd_path(&point),
                            None,
                            libc::MS_BIND | libc::MS_REC,
                            None,
                        )?;
                    }
                }
                Entry::Link(to) => {
                    let to = std::ffi::CString::new(to.clone().into_vec())
                        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                    let name = sys::cstring(Path::new(name))?;
                    // SAFETY: symlinkat() reads two NUL-terminated strings that outlive
                    // the call.
                    if unsafe { libc::symlinkat(to.as_ptr(), tree.as_raw_fd(), name.as_ptr()) } != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
        }
        // The copy and every entry in it, at once.
        sys::set_attr(tree, READ_ONLY, true)
    }

    /// Cover the denied paths of the attached copy (after every bind is attached: one may
    /// lie inside another).
    pub(super) fn attach_masks(&self) -> io::Result<()> {
        // Only a share's view has masks, and it is always a copy.
        let Source::Tree(tree) = &self.source else {
            return Ok(());
        };
        for (rel, mask) in &self.masks {
            let Some(at) = covered(tree, rel)? else {
                continue;
            };
            sys::move_mount(mask, &at)?;
        }
        Ok(())
    }

    /// The inodes the view covers, as the share's configuration lists them.
    pub(super) fn hidden_inodes(&self) -> Vec<(u64, u64)> {
        let mut ids: Vec<(u64, u64)> = self.hidden.iter().map(|i| (i.dev, i.ino)).collect();
        ids.sort_unstable();
        ids
    }
}

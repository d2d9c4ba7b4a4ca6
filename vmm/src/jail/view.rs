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
    Tree { tree: OwnedFd, is_dir: bool },
    Link(OsString),
}

/// One bind, copied in the host's view, not yet attached ([`Detached::attach`]).
pub(super) struct Detached {
    tree: OwnedFd,
    is_dir: bool,
    /// For an allowlisted root (`tree` is then an empty tmpfs): its entries, by name.
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

/// Copy `bind` as the process now sees it (the host's view).
pub(super) fn detach(bind: &Bind) -> Result<Detached, JailError> {
    let path = &bind.path;
    let attrs = attrs(bind.access);
    let copy = |dir: libc::c_int, name: &Path, recursive: bool, nofollow: bool| {
        let tree = sys::clone_tree(dir, name, recursive, nofollow)?;
        sys::set_attr(&tree, attrs, recursive)?;
        Ok::<_, io::Error>(tree)
    };
    let mut hidden = HashSet::new();
    let (tree, is_dir, entries) = match bind.view.as_ref().and_then(|v| v.only.as_ref()) {
        None => {
            let tree = copy(AT_FDCWD, path, bind.recursive, false)
                .map_err(path_error("copy the mount of", path))?;
            let is_dir = sys::is_dir(&sys::stat(&tree).map_err(path_error("inspect", path))?);
            (tree, is_dir, None)
        }
        Some(only) => {
            let dir = sys::open_path(AT_FDCWD, path, libc::O_DIRECTORY)
                .map_err(path_error("open", path))?;
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(path).map_err(path_error("list", path))? {
                let name = entry.map_err(path_error("list", path))?.file_name();
                let at = path.join(&name);
                let fd = match sys::open_path(dir.as_raw_fd(), Path::new(&name), libc::O_NOFOLLOW) {
                    Ok(fd) => fd,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(path_error("open", &at)(e)),
                };
                let st = sys::stat(&fd).map_err(path_error("inspect", &at))?;
                let allowed = only.iter().any(|n| n.as_bytes() == name.as_bytes());
                let kind = st.st_mode & libc::S_IFMT;
                let entry = match kind {
                    _ if !allowed => None,
                    libc::S_IFDIR | libc::S_IFREG => Some(Entry::Tree {
                        tree: copy(dir.as_raw_fd(), Path::new(&name), true, true)
                            .map_err(path_error("copy the mount of", &at))?,
                        is_dir: kind == libc::S_IFDIR,
                    }),
                    libc::S_IFLNK => Some(Entry::Link(
                        std::fs::read_link(&at)
                            .map_err(path_error("read the link", &at))?
                            .into_os_string(),
                    )),
                    _ => None,
                };
                match entry {
                    Some(entry) => entries.push((name, entry)),
                    None => {
                        hidden.insert(id(&st));
                    }
                }
            }
            let tree = sys::tmpfs("mode=0755,size=16k,nr_inodes=256", RESTRICTED)
                .map_err(path_error("make the jail's copy of", path))?;
            (tree, true, Some(entries))
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
        tree,
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

    /// Attach the copy on `target` (in the mount namespace this thread is in), with the
    /// entries of an allowlisted root; then make such a root read-only.
    pub(super) fn attach(&self, target: &OwnedFd) -> io::Result<()> {
        sys::move_mount(&self.tree, target)?;
        let Some(entries) = &self.entries else {
            return Ok(());
        };
        for (name, entry) in entries {
            match entry {
                Entry::Tree { tree, is_dir } => {
                    let point = sys::make_at(&self.tree, Path::new(name), *is_dir)?;
                    sys::move_mount(tree, &point)?;
                }
                Entry::Link(to) => {
                    let to = std::ffi::CString::new(to.clone().into_vec())
                        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                    let name = sys::cstring(Path::new(name))?;
                    // SAFETY: symlinkat() reads two NUL-terminated strings that outlive
                    // the call.
                    if unsafe { libc::symlinkat(to.as_ptr(), self.tree.as_raw_fd(), name.as_ptr()) }
                        != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
        }
        sys::set_attr(&self.tree, READ_ONLY, false)
    }

    /// Cover the denied paths of the attached copy (after every bind is attached: one may
    /// lie inside another).
    pub(super) fn attach_masks(&self) -> io::Result<()> {
        for (rel, mask) in &self.masks {
            let Some(at) = covered(&self.tree, rel)? else {
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

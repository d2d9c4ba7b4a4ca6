//! From a share's config to what the server needs: the resolved root and the denied set.
//!
//! Paths are resolved once, here; from then on the server only works relative to the
//! root's directory fd and identifies denied files by `(st_dev, st_ino)` and by
//! `(parent directory, name)`, never by path strings.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::{FsError, FsShareConfig};

/// Entries visited at most while collecting the hard-linkable files of one denied
/// directory tree.
pub const MAX_DENIED_WALK: usize = 500_000;
/// The longest share tag the virtio-fs config space holds.
const MAX_TAG_LEN: usize = 36;

/// A host inode: `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InodeId {
    pub dev: u64,
    pub ino: u64,
}

impl InodeId {
    pub fn of(md: &fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
        }
    }
}

/// What the guest must not see inside one share.
#[derive(Debug, Default, Clone)]
pub struct DeniedSet {
    /// Denied inodes: the denied paths themselves, and the files with more than one link
    /// inside denied directories (their other names are hidden through this set).
    inodes: HashSet<InodeId>,
    /// Denied names: `(parent directory, name)`, whether the name exists yet or not.
    names: HashSet<(InodeId, Vec<u8>)>,
    /// `(root directory, names)`: when set, every other name directly under the root is
    /// denied.
    root_allowlist: Option<(InodeId, HashSet<Vec<u8>>)>,
    /// The directories between the share's root and a denied path: the guest may not
    /// rename, remove or replace them, or the denied path would move out from under its
    /// rule on the host (where the next sandbox resolves the rule by path again).
    pinned: HashSet<InodeId>,
}

impl DeniedSet {
    pub fn is_denied_inode(&self, id: InodeId) -> bool {
        self.inodes.contains(&id)
    }

    pub fn is_denied_name(&self, parent: InodeId, name: &[u8]) -> bool {
        if let Some((root, allowed)) = &self.root_allowlist {
            if *root == parent && !allowed.contains(name) {
                return true;
            }
        }
        // Avoid allocating for the common case of no denied names at all.
        !self.names.is_empty() && self.names.contains(&(parent, name.to_vec()))
    }

    /// Whether `id` is a directory above a denied path (see the field).
    pub fn is_pinned(&self, id: InodeId) -> bool {
        self.pinned.contains(&id)
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub fn name_count(&self) -> usize {
        self.names.len()
    }
}

/// A share whose paths were checked and resolved.
#[derive(Debug, Clone)]
pub struct PreparedShare {
    pub tag: String,
    /// The canonical host path of the root.
    pub root: PathBuf,
    pub root_id: InodeId,
    /// The file systems the guest may see in it: the root's, and those of the allowed
    /// entries of a root allowlist (an allowed name shows what the host shows there,
    /// mounted or not; a jail binds each of them: `crate::jail::ShareView`).
    pub devices: Vec<u64>,
    pub readonly: bool,
    pub denied: DeniedSet,
}

pub(crate) fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
        return Err(FsError::InvalidTag(tag.to_owned()));
    }
    Ok(())
}

pub(crate) fn check_guest_path(share: &FsShareConfig) -> Result<(), FsError> {
    if !share.guest_path.is_absolute() {
        return Err(FsError::GuestPathNotAbsolute {
            tag: share.tag.clone(),
            path: share.guest_path.clone(),
        });
    }
    Ok(())
}

pub(crate) fn check_allowlist(share: &FsShareConfig) -> Result<(), FsError> {
    for name in share.root_allowlist.iter().flatten() {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(FsError::BadAllowedName {
                tag: share.tag.clone(),
                name: name.clone(),
            });
        }
    }
    Ok(())
}

/// Check a share's config and resolve its paths.
pub fn prepare(share: &FsShareConfig) -> Result<PreparedShare, FsError> {
    prepare_with(share, &read_mountinfo()?)
}

/// The host's mount table, for [`prepare_with`].
pub fn read_mountinfo() -> Result<String, FsError> {
    fs::read_to_string(MOUNTINFO).map_err(|source| FsError::HostPath {
        path: PathBuf::from(MOUNTINFO),
        source,
    })
}

/// [`prepare`] against `mountinfo` ([`read_mountinfo`]): a VM's shares read it once.
pub fn prepare_with(share: &FsShareConfig, mountinfo: &str) -> Result<PreparedShare, FsError> {
    check_tag(&share.tag)?;
    check_guest_path(share)?;
    check_allowlist(share)?;
    let root = fs::canonicalize(&share.host_path).map_err(|source| FsError::HostPath {
        path: share.host_path.clone(),
        source,
    })?;
    let md = fs::symlink_metadata(&root).map_err(|source| FsError::HostPath {
        path: root.clone(),
        source,
    })?;
    if !md.is_dir() {
        return Err(FsError::NotADirectory(root));
    }
    let mut denied = DeniedSet::default();
    for path in &share.denied {
        add_denied(&mut denied, &root, path)?;
    }
    denied.inodes.extend(
        share
            .hidden_inodes
            .iter()
            .map(|&(dev, ino)| InodeId { dev, ino }),
    );
    let allowed = share.root_allowlist.as_deref().unwrap_or_default();
    hide_mount_points(&mut denied, &root, mountinfo, allowed)?;
    let mut devices = vec![md.dev()];
    if let Some(allowed) = &share.root_allowlist {
        deny_all_but(&mut denied, &root, InodeId::of(&md), allowed)?;
        for name in allowed {
            match fs::symlink_metadata(root.join(name)) {
                Ok(entry) if !entry.is_symlink() && !devices.contains(&entry.dev()) => {
                    devices.push(entry.dev())
                }
                _ => {}
            }
        }
    }
    Ok(PreparedShare {
        tag: share.tag.clone(),
        root_id: InodeId::of(&md),
        devices,
        root,
        readonly: share.readonly,
        denied,
    })
}

fn add_denied(set: &mut DeniedSet, root: &Path, path: &Path) -> Result<(), FsError> {
    if !path.is_absolute() {
        return Err(FsError::DeniedNotAbsolute(path.to_path_buf()));
    }
    // The last component is denied as it is (a symlink is denied itself, not its target);
    // everything above it is resolved.
    let (parent, name) = split_last(path)?;
    let parent = match fs::canonicalize(parent) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FsError::DeniedParentMissing(path.to_path_buf()))
        }
        Err(source) => {
            return Err(FsError::DeniedPath {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let full = parent.join(name);
    if full == root {
        return Err(FsError::DeniedIsShareRoot(path.to_path_buf()));
    }
    if !full.starts_with(root) {
        return Err(FsError::DeniedOutsideShare {
            denied: path.to_path_buf(),
            share: root.to_path_buf(),
        });
    }
    let parent_md = metadata(&parent, path)?;
    set.names
        .insert((InodeId::of(&parent_md), name.as_bytes().to_vec()));
    // Pin the directories from the denied path's parent up to (not including) the root.
    let mut dir = parent.as_path();
    while dir != root && dir.starts_with(root) {
        set.pinned.insert(InodeId::of(&metadata(dir, path)?));
        let Some(up) = dir.parent() else { break };
        dir = up;
    }
    match fs::symlink_metadata(&full) {
        Ok(md) => {
            set.inodes.insert(InodeId::of(&md));
            if md.is_dir() {
                collect_linked_files(&mut set.inodes, &full, md.dev())?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FsError::DeniedPath { path: full, source }),
    }
}

/// Deny every name directly under `root` except `allowed`: by name (so entries the host
/// adds later stay absent) and, for what exists now, by inode (so a hard link to such a
/// file elsewhere in the share is hidden too). The trees below the hidden entries are not
/// walked (a shared home directory's parent may hold a lot): a file with several links
/// deep inside a hidden directory stays visible under a name the allowlist admits.
fn deny_all_but(
    set: &mut DeniedSet,
    root: &Path,
    root_id: InodeId,
    allowed: &[String],
) -> Result<(), FsError> {
    let allowed: HashSet<Vec<u8>> = allowed.iter().map(|n| n.as_bytes().to_vec()).collect();
    let entries = fs::read_dir(root).map_err(|source| FsError::HostPath {
        path: root.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| FsError::HostPath {
            path: root.to_path_buf(),
            source,
        })?;
        if allowed.contains(entry.file_name().as_bytes()) {
            continue;
        }
        let path = entry.path();
        match fs::symlink_metadata(&path) {
            Ok(md) => {
                set.inodes.insert(InodeId::of(&md));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(FsError::DeniedPath { path, source }),
        }
    }
    set.root_allowlist = Some((root_id, allowed));
    Ok(())
}

/// Where the VMM's mount table is read from.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Hide every mount point strictly inside `root` by name (its parent directory and its
/// last component), as listed in `mountinfo` (the format of `/proc/self/mountinfo`),
/// except the `allowed` names of a root allowlist directly under the root (granted by
/// name: they show what the host shows there). A mount of another file system is also
/// hidden by the device check in the policy layer; this covers bind mounts of the same
/// file system, which would otherwise show content from outside the share.
fn hide_mount_points(
    set: &mut DeniedSet,
    root: &Path,
    mountinfo: &str,
    allowed: &[String],
) -> Result<(), FsError> {
    for line in mountinfo.lines() {
        let Some(field) = line.split(' ').nth(4) else {
            continue;
        };
        let point = PathBuf::from(OsStr::from_bytes(&unescape_mount_path(field)));
        if point == root || !point.starts_with(root) {
            continue;
        }
        let (Some(parent), Some(name)) = (point.parent(), point.file_name()) else {
            continue;
        };
        if parent == root && allowed.iter().any(|a| a.as_bytes() == name.as_bytes()) {
            continue;
        }
        let parent_md = metadata(parent, &point)?;
        set.names
            .insert((InodeId::of(&parent_md), name.as_bytes().to_vec()));
    }
    Ok(())
}

/// Undo the octal escapes (`\040` for a space, …) of a mountinfo path.
fn unescape_mount_path(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match octal {
            Some(v) if b == b'\\' && v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// `path` as (everything above the last component, the last component), refusing a last
/// component of `.` or `..`.
fn split_last(path: &Path) -> Result<(&Path, &OsStr), FsError> {
    let bad = || FsError::DeniedPath {
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    };
    match path.components().next_back() {
        Some(Component::Normal(name)) => Ok((path.parent().ok_or_else(bad)?, name)),
        _ => Err(bad()),
    }
}

fn metadata(path: &Path, denied: &Path) -> Result<fs::Metadata, FsError> {
    fs::symlink_metadata(path).map_err(|source| FsError::DeniedPath {
        path: denied.to_path_buf(),
        source,
    })
}

/// Add every non-directory with more than one link under the denied directory `dir` to the
/// denied inodes, so its other names elsewhere in the share are hidden too. Files with one
/// link can only be reached through the denied directory. Symlinks are not followed and
/// other file systems are not entered (the server never enters them either).
pub(crate) fn collect_linked_files(
    inodes: &mut HashSet<InodeId>,
    dir: &Path,
    dev: u64,
) -> Result<(), FsError> {
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut visited = 0usize;
    while let Some(current) = stack.pop() {
        let entries = fs::read_dir(&current).map_err(|source| FsError::DeniedPath {
            path: current.clone(),
            source,
        })?;
        for entry in entries {
            visited += 1;
            if visited > MAX_DENIED_WALK {
                return Err(FsError::DeniedTreeTooLarge {
                    path: dir.to_path_buf(),
                    limit: MAX_DENIED_WALK,
                });
            }
            let entry = entry.map_err(|source| FsError::DeniedPath {
                path: current.clone(),
                source,
            })?;
            let path = entry.path();
            let md = metadata(&path, &path)?;
            if md.dev() != dev {
                continue;
            }
            if md.is_dir() {
                stack.push(path);
            } else if md.nlink() > 1 {
                inodes.insert(InodeId::of(&md));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fs::tests::TempDir;

    fn share(root: &Path, denied: &[PathBuf]) -> FsShareConfig {
        FsShareConfig {
            tag: "mxcfs0".into(),
            host_path: root.to_path_buf(),
            guest_path: "/work".into(),
            readonly: false,
            denied: denied.to_vec(),
            root_allowlist: None,
            hidden_inodes: Vec::new(),
        }
    }

    #[test]
    fn denied_files_dirs_and_missing_names_are_collected() {
        let dir = TempDir::new();
        std::fs::write(dir.path("secret"), b"s").unwrap();
        std::fs::create_dir_all(dir.path("private/deep")).unwrap();
        std::fs::write(dir.path("private/deep/key"), b"k").unwrap();
        std::fs::hard_link(dir.path("private/deep/key"), dir.path("alias")).unwrap();
        std::fs::write(dir.path("private/single"), b"1").unwrap();
        let denied = [dir.path("secret"), dir.path("private"), dir.path("not-yet")];

        let prepared = prepare(&share(dir.root(), &denied)).unwrap();

        // secret, private, and the linked key (not the single-link file).
        assert_eq!(prepared.denied.inode_count(), 3);
        assert_eq!(prepared.denied.name_count(), 3);
        let key = std::fs::metadata(dir.path("alias")).unwrap();
        assert!(prepared.denied.is_denied_inode(InodeId::of(&key)));
        assert!(prepared.denied.is_denied_name(prepared.root_id, b"not-yet"));
    }

    #[test]
    fn bad_configs_are_refused_with_the_path() {
        let dir = TempDir::new();
        let outside = TempDir::new();
        std::fs::write(dir.path("file"), b"x").unwrap();
        let cases = [
            share(&dir.path("missing"), &[]),
            share(&dir.path("file"), &[]),
            share(dir.root(), &[outside.path("x")]),
            share(dir.root(), &[dir.root().to_path_buf()]),
            share(dir.root(), &[dir.path("no/such/deep")]),
            share(dir.root(), &["relative".into()]),
            share(dir.root(), &[dir.path("..")]),
            FsShareConfig {
                tag: String::new(),
                ..share(dir.root(), &[])
            },
            FsShareConfig {
                tag: "x".repeat(37),
                ..share(dir.root(), &[])
            },
            FsShareConfig {
                guest_path: "rel".into(),
                ..share(dir.root(), &[])
            },
        ];

        let errors: Vec<String> = cases
            .iter()
            .map(|c| prepare(c).unwrap_err().to_string())
            .collect();

        assert!(errors[0].starts_with("cannot open shared directory"));
        assert!(errors[1].ends_with("is not a directory"));
        assert!(errors[2].contains("is not inside share"));
        assert!(errors[3].contains("is the share's root"));
        assert!(errors[4].contains("parent directory does not exist"));
        assert!(errors[5].contains("must be absolute"));
        assert!(errors[6].starts_with("cannot inspect denied path"));
        assert!(errors[7].starts_with("share tag"));
        assert!(errors[8].starts_with("share tag"));
        assert!(errors[9].contains("must be absolute"));
    }

    #[test]
    fn a_root_allowlist_hides_every_other_name_now_and_later() {
        let dir = TempDir::new();
        std::fs::write(dir.path("passwd"), b"p").unwrap();
        std::fs::write(dir.path("shadow"), b"s").unwrap();
        std::fs::create_dir(dir.path("ssh")).unwrap();
        let config = FsShareConfig {
            root_allowlist: Some(vec!["passwd".into(), "hosts".into()]),
            hidden_inodes: Vec::new(),
            ..share(dir.root(), &[])
        };

        let prepared = prepare(&config).unwrap();

        let shadow = std::fs::symlink_metadata(dir.path("shadow")).unwrap();
        let root = prepared.root_id;
        let denied = &prepared.denied;
        assert_eq!(
            [
                denied.is_denied_name(root, b"passwd"),
                denied.is_denied_name(root, b"hosts"),
                denied.is_denied_name(root, b"shadow"),
                denied.is_denied_name(root, b"ssh"),
                denied.is_denied_name(root, b"made-later"),
                denied.is_denied_inode(InodeId::of(&shadow)),
            ],
            [false, false, true, true, true, true]
        );
    }

    #[test]
    fn allowlist_names_must_be_single_components() {
        let dir = TempDir::new();
        let bad = ["", ".", "..", "a/b"].map(|name| FsShareConfig {
            root_allowlist: Some(vec![name.into()]),
            hidden_inodes: Vec::new(),
            ..share(dir.root(), &[])
        });

        let refused = bad.iter().filter(|c| prepare(c).is_err()).count();

        assert_eq!(refused, 4);
    }

    #[test]
    fn mount_points_inside_the_share_are_hidden_by_name() {
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.path("a b/mnt")).unwrap();
        std::fs::create_dir(dir.path("other")).unwrap();
        let root = dir.root().display().to_string();
        let mountinfo = format!(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             30 22 8:1 /x {root} rw - ext4 /dev/sda1 rw\n\
             31 30 8:1 /y {root}/a\\040b/mnt rw - ext4 /dev/sda1 rw\n\
             32 22 0:5 / {root}-sibling rw - tmpfs tmpfs rw\n\
             short line\n"
        );
        let mut set = DeniedSet::default();

        hide_mount_points(&mut set, dir.root(), &mountinfo, &[]).unwrap();

        let parent = InodeId::of(&std::fs::metadata(dir.path("a b")).unwrap());
        assert_eq!(set.name_count(), 1);
        assert!(set.is_denied_name(parent, b"mnt"));
    }

    #[test]
    fn an_allowlisted_name_shows_what_is_mounted_there_and_its_file_system_counts() {
        let dir = TempDir::new();
        for d in ["ssl/certs", "ssh"] {
            std::fs::create_dir_all(dir.path(d)).unwrap();
        }
        std::fs::write(dir.path("passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        let root = dir.root().display().to_string();
        // Mounted on: an allowed file, an allowed directory, a name not allowed, and a
        // directory inside an allowed one.
        let mountinfo = format!(
            "30 22 8:1 /p {root}/passwd ro - ext4 /dev/sda1 rw\n\
             31 22 8:1 /s {root}/ssl ro - ext4 /dev/sda1 rw\n\
             32 22 8:1 /h {root}/ssh ro - ext4 /dev/sda1 rw\n\
             33 22 8:1 /c {root}/ssl/certs ro - ext4 /dev/sda1 rw\n"
        );
        let mut config = share(dir.root(), &[]);
        config.root_allowlist = Some(vec!["passwd".into(), "ssl".into()]);

        let prepared = prepare_with(&config, &mountinfo).unwrap();

        let root_id = prepared.root_id;
        let ssl = InodeId::of(&std::fs::metadata(dir.path("ssl")).unwrap());
        let denied = &prepared.denied;
        assert!(!denied.is_denied_name(root_id, b"passwd"));
        assert!(!denied.is_denied_name(root_id, b"ssl"));
        assert!(denied.is_denied_name(root_id, b"ssh"));
        assert!(denied.is_denied_name(ssl, b"certs"));
        assert_eq!(prepared.devices, [root_id.dev]);
    }

    #[test]
    fn inodes_a_jail_covered_are_denied() {
        let dir = TempDir::new();
        std::fs::write(dir.path("alias"), b"secret").unwrap();
        let alias = InodeId::of(&std::fs::metadata(dir.path("alias")).unwrap());
        let mut config = share(dir.root(), &[]);
        config.hidden_inodes = vec![(alias.dev, alias.ino)];

        let prepared = prepare(&config).unwrap();

        assert!(prepared.denied.is_denied_inode(alias));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        let cases = [
            "/a\\040b",
            "/tab\\011x",
            "/back\\134slash",
            "/plain",
            "/odd\\09",
        ];

        let out = cases.map(|c| String::from_utf8(unescape_mount_path(c)).unwrap());

        assert_eq!(
            out,
            ["/a b", "/tab\tx", "/back\\slash", "/plain", "/odd\\09"]
        );
    }

    #[test]
    fn a_symlinked_share_path_resolves_to_its_target() {
        let dir = TempDir::new();
        std::fs::create_dir(dir.path("real")).unwrap();
        std::os::unix::fs::symlink(dir.path("real"), dir.path("link")).unwrap();

        let prepared = prepare(&share(&dir.path("link"), &[dir.path("link/x")])).unwrap();

        assert_eq!(
            prepared.root,
            std::fs::canonicalize(dir.path("real")).unwrap()
        );
        assert_eq!(prepared.denied.name_count(), 1);
    }
}

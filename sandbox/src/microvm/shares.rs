//! From the policy's file view to the microVM's virtio-fs shares.
//!
//! Every shared directory becomes one virtio-fs device (`vmm::devices::fs`) that the host
//! serves with the policy enforced there: read-only shares refuse every change on the host,
//! denied paths inside a share do not exist for the guest, and nothing outside a share can
//! be reached through it. The guest agent mounts each share at the same path as on the
//! host (`mxc.mounts=` on the kernel command line) before it reports ready.
//!
//! # What is shared
//! - **The system view** ([`SystemView`]), read-only: by default the host's `/usr`, `/bin`,
//!   `/sbin`, `/lib*` (a merged-`/usr` host's `/bin -> usr/bin` links are recreated in the
//!   guest, `mxc.links=`) and the non-secret part of `/etc` ([`ETC_ALLOWLIST`], the same
//!   list the process tier uses; nothing else of `/etc` exists for the guest, including
//!   files the host adds later). Or the same directories of a Debian rootfs built by
//!   `mxc-vm image build --rootfs`, for hosts whose own system must not be exposed. Or
//!   nothing: the guest then has the initramfs's busybox. `/etc/shadow`, `/etc/gshadow`,
//!   `/etc/ssh` and `/etc/ssl/private` are never shared (a policy that grants them is
//!   refused); home directories, `/root`, `/proc`, `/sys` and `/dev` are never part of the
//!   system view, and a policy cannot share `/proc`, `/sys`, `/dev` or `/` itself.
//! - **The policy's grants.** A read-only or read-write directory is one share. A file is
//!   shared through its directory, with every other name in that directory absent (a root
//!   allowlist, enforced on the host); several files of one directory with the same access
//!   share one device. Denied paths inside a share are hidden by the host, including
//!   denied paths below a nested share (so unmounting the nested share in the guest shows
//!   nothing more).
//!
//! # Nesting
//! A share inside another one is mounted over it in the guest. The guest is root and can
//! unmount the inner share, so nesting must not lend the outer share any right the policy
//! withheld. Hence:
//! - read-write inside read-only: fine (unmounted, the inner tree is read-only);
//! - the same access inside: the outer share already serves it; no second device;
//! - read-only inside read-write: refused (the host would serve the inner tree writable
//!   through the outer share); grant the directories separately;
//! - inside a share that shows only some names (a file's directory, `/etc`): only a
//!   directory directly in it, whose name is then shown too; anything deeper is refused;
//! - a read-write file inside a read-only directory share: refused (its directory would
//!   be mounted over and lose its other entries).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use policy::{Access, FsView};
use proto::mounts::{GuestLink, GuestMount};
use vmm::devices::fs::{share_tag, FsShareConfig, RunAs};

pub use crate::view::{ETC_ALLOWLIST, SECRET_PATHS, SYSTEM_DIRS};

/// Paths (relative to a system root) never shared with a guest: the secret paths every
/// tier hides ([`SECRET_PATHS`]).
pub fn never_shared() -> impl Iterator<Item = &'static Path> {
    SECRET_PATHS
        .iter()
        .map(|p| Path::new(p).strip_prefix("/").unwrap_or(Path::new(p)))
}

/// Host paths a policy cannot share: pseudo file systems of the host, and the guest's
/// own root.
const NOT_SHAREABLE: &[&str] = &["/proc", "/sys", "/dev"];

/// Which read-only system directories the guest gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SystemView {
    /// The host's `/usr`, `/bin`, `/sbin`, `/lib*` and the allowlisted part of `/etc`.
    #[default]
    Host,
    /// The same directories of a root file system tree (e.g. the Debian rootfs that
    /// `mxc-vm image build --rootfs` makes); all of its `/etc` but the secrets.
    Rootfs(PathBuf),
    /// None: the guest has only the initramfs (busybox).
    None,
}

/// Errors turning a file view into shares.
#[derive(Debug, thiserror::Error)]
pub enum SharesError {
    #[error("{} cannot be shared with a VM (host pseudo file system or the guest's root)", .0.display())]
    NotShareable(PathBuf),
    #[error("{} is never shared with a VM (it holds host secrets)", .0.display())]
    Secret(PathBuf),
    #[error(
        "{} is read-only inside the read-write share {}: the guest could unmount it and \
         write through the outer share; grant the directories separately",
        .inner.display(), .outer.display()
    )]
    ReadOnlyInsideReadWrite { inner: PathBuf, outer: PathBuf },
    #[error(
        "{} lies deeper inside {}, of which only some entries are shared; share {} or \
         a directory directly inside it instead",
        .inner.display(), .outer.display(), .outer.display()
    )]
    InsidePartialShare { inner: PathBuf, outer: PathBuf },
    #[error(
        "{} is read-write inside the read-only share {}: a file's own access needs its \
         directory as a share; grant the directory read-write instead",
        .inner.display(), .outer.display()
    )]
    WritableFileInsideReadOnly { inner: PathBuf, outer: PathBuf },
    #[error(
        "entries of {} have different access (read-only and read-write files of one \
         directory, or a file whose access differs from its directory's)",
        .0.display()
    )]
    MixedAccess(PathBuf),
    #[error("the system root {} is not a directory", .0.display())]
    BadSystemRoot(PathBuf),
    #[error("the share list does not fit on the kernel command line")]
    Encoding(#[source] proto::ProtoError),
}

/// Everything the guest's files need: the VMM's shares and what the agent is told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestFiles {
    /// One virtio-fs device each, in this order (tags `mxcfs0`, …).
    pub shares: Vec<FsShareConfig>,
    /// Links the agent creates before mounting (the system view's `/bin -> usr/bin`).
    pub links: Vec<GuestLink>,
    /// The command's working directory when the request names none.
    pub default_cwd: Option<PathBuf>,
}

impl GuestFiles {
    /// The kernel command-line words that tell the agent what to mount (empty when
    /// nothing is shared).
    /// The links and mounts as `Control::Setup` carries them (`mxc.links=` and
    /// `mxc.mounts=` values; empty strings for none).
    pub fn encoded(&self) -> Result<(String, String), SharesError> {
        let links = if self.links.is_empty() {
            String::new()
        } else {
            proto::mounts::encode_links(&self.links).map_err(SharesError::Encoding)?
        };
        let mounts: Vec<GuestMount> = self
            .shares
            .iter()
            .map(|s| GuestMount {
                tag: s.tag.clone(),
                path: s.guest_path.clone(),
                readonly: s.readonly,
            })
            .collect();
        let mounts = if mounts.is_empty() {
            String::new()
        } else {
            proto::mounts::encode_mounts(&mounts).map_err(SharesError::Encoding)?
        };
        Ok((links, mounts))
    }

    pub fn cmdline(&self) -> Result<String, SharesError> {
        let (links, mounts) = self.encoded()?;
        let words = [
            (proto::mounts::LINKS_PARAM, links),
            (proto::mounts::MOUNTS_PARAM, mounts),
        ];
        Ok(words
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(param, value)| format!("{param}={value}"))
            .collect::<Vec<_>>()
            .join(" "))
    }
}

/// The user to serve shares as when mxc-vm runs as root through `sudo`
/// (`SUDO_UID`/`SUDO_GID`): files the guest creates then belong to that user, and the
/// host checks each access as that user. `None` otherwise (the VMM's own user, without
/// capabilities).
pub fn sudo_user() -> Option<RunAs> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |name: &str| std::env::var(name).ok()?.parse::<u32>().ok();
    match (id("SUDO_UID"), id("SUDO_GID")) {
        (Some(uid), Some(gid)) if uid != 0 => Some(RunAs { uid, gid }),
        _ => None,
    }
}

/// One directory to share, before nesting is resolved.
#[derive(Debug, Clone)]
struct Unit {
    host: PathBuf,
    guest: PathBuf,
    readonly: bool,
    /// `Some`: only these names of the directory (a file's directory, `/etc`).
    allow: Option<BTreeSet<String>>,
    system: bool,
    /// What the policy named (a file's own path for a file share), for messages.
    named: PathBuf,
}

/// The shares for `view` with `system` as the system view. `host_cwd` is where the user
/// ran mxc-vm: the command starts there when the policy grants it.
pub fn plan(
    view: &FsView,
    system: &SystemView,
    host_cwd: Option<&Path>,
) -> Result<GuestFiles, SharesError> {
    let (mut units, links, system_root) = system_units(system)?;
    if system_root.is_none() {
        // A system directory the policy denies (or lies under a denied path) is not
        // shared: the policy wins over the default view.
        units.retain(|u| {
            !view
                .entries
                .iter()
                .any(|e| e.access == Access::Denied && u.host.starts_with(&e.path))
        });
    }
    for entry in view.entries.iter().filter(|e| e.exists) {
        if entry.access == Access::Denied {
            continue;
        }
        check_shareable(&entry.path)?;
        let readonly = entry.access == Access::ReadOnly;
        let unit = if entry.is_dir {
            Unit {
                host: entry.path.clone(),
                guest: entry.path.clone(),
                readonly,
                allow: None,
                system: false,
                named: entry.path.clone(),
            }
        } else {
            let (Some(dir), Some(name)) = (entry.path.parent(), entry.path.file_name()) else {
                return Err(SharesError::NotShareable(entry.path.clone()));
            };
            Unit {
                host: dir.to_path_buf(),
                guest: dir.to_path_buf(),
                readonly,
                allow: Some(BTreeSet::from([name.to_string_lossy().into_owned()])),
                system: false,
                named: entry.path.clone(),
            }
        };
        // A file directly in `/` would make the guest's root a share.
        check_shareable(&unit.guest)?;
        units.push(unit);
    }
    let units = resolve_nesting(merge_same_paths(units)?)?;

    let mut shares = Vec::with_capacity(units.len());
    let (system_units, user_units): (Vec<Unit>, Vec<Unit>) =
        units.into_iter().partition(|u| u.system);
    for unit in system_units.into_iter().chain(user_units) {
        let denied = denied_inside(view, &unit.host, system_root.as_deref());
        shares.push(FsShareConfig {
            tag: share_tag(shares.len()),
            host_path: unit.host,
            guest_path: unit.guest,
            readonly: unit.readonly,
            denied,
            root_allowlist: unit.allow.map(|a| a.into_iter().collect()),
            hidden_inodes: Vec::new(),
        });
    }
    Ok(GuestFiles {
        shares,
        links,
        default_cwd: default_cwd(view, host_cwd),
    })
}

/// Refuse what no policy may share with a VM.
fn check_shareable(path: &Path) -> Result<(), SharesError> {
    let pseudo = NOT_SHAREABLE.iter().any(|p| path.starts_with(p));
    if pseudo || path == Path::new("/") || path.starts_with(proto::GUEST_PRIVATE_DIR) {
        return Err(SharesError::NotShareable(path.to_path_buf()));
    }
    if never_shared().any(|s| path.starts_with(Path::new("/").join(s))) {
        return Err(SharesError::Secret(path.to_path_buf()));
    }
    Ok(())
}

type SystemParts = (Vec<Unit>, Vec<GuestLink>, Option<PathBuf>);

/// The system view's shares and links, and its root when it is not the host's.
fn system_units(system: &SystemView) -> Result<SystemParts, SharesError> {
    let (root, host) = match system {
        SystemView::None => return Ok((Vec::new(), Vec::new(), None)),
        SystemView::Host => (PathBuf::from("/"), true),
        SystemView::Rootfs(root) => {
            if !root.is_dir() {
                return Err(SharesError::BadSystemRoot(root.clone()));
            }
            (root.clone(), false)
        }
    };
    let mut units = Vec::new();
    let mut links = Vec::new();
    for dir in SYSTEM_DIRS {
        let guest = PathBuf::from(dir);
        let path = root.join(dir.trim_start_matches('/'));
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if md.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&path) {
                links.push(GuestLink {
                    path: guest,
                    target,
                });
            }
        } else if md.is_dir() {
            units.push(system_unit(path, guest, None));
        }
    }
    let etc = root.join("etc");
    if etc.is_dir() && !etc.is_symlink() {
        let allow = host.then(|| ETC_ALLOWLIST.iter().map(|s| s.to_string()).collect());
        units.push(system_unit(etc, PathBuf::from("/etc"), allow));
    }
    Ok((units, links, (!host).then_some(root)))
}

fn system_unit(host: PathBuf, guest: PathBuf, allow: Option<BTreeSet<String>>) -> Unit {
    Unit {
        named: host.clone(),
        host,
        guest,
        readonly: true,
        allow,
        system: true,
    }
}

/// Units for the same guest directory become one: the same access merges their names
/// (a whole directory wins over some of its names); a policy directory replaces the
/// system view's; anything else is a conflict.
fn merge_same_paths(units: Vec<Unit>) -> Result<Vec<Unit>, SharesError> {
    let mut merged: BTreeMap<PathBuf, Unit> = BTreeMap::new();
    for unit in units {
        let Some(existing) = merged.get_mut(&unit.guest) else {
            merged.insert(unit.guest.clone(), unit);
            continue;
        };
        if existing.readonly == unit.readonly {
            existing.allow = match (existing.allow.take(), unit.allow) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                _ => None,
            };
            if !unit.system {
                existing.system = false;
                existing.host = unit.host;
                existing.named = unit.named;
            }
        } else if existing.system && !unit.system && unit.allow.is_none() {
            *existing = unit;
        } else {
            return Err(SharesError::MixedAccess(unit.guest));
        }
    }
    Ok(merged.into_values().collect())
}

/// Apply the nesting rules (see the module docs) to units sorted by guest path.
fn resolve_nesting(units: Vec<Unit>) -> Result<Vec<Unit>, SharesError> {
    let mut kept: Vec<Unit> = Vec::with_capacity(units.len());
    for unit in units {
        let outer = kept
            .iter_mut()
            .filter(|k| unit.guest.starts_with(&k.guest))
            .max_by_key(|k| k.guest.components().count());
        let Some(outer) = outer else {
            kept.push(unit);
            continue;
        };
        if !outer.readonly && unit.readonly {
            return Err(SharesError::ReadOnlyInsideReadWrite {
                inner: unit.named,
                outer: outer.guest.clone(),
            });
        }
        if let Some(names) = outer.allow.as_mut() {
            let direct = unit.guest.parent() == Some(outer.guest.as_path());
            match (direct, unit.guest.file_name()) {
                (true, Some(name)) if unit.allow.is_none() => {
                    names.insert(name.to_string_lossy().into_owned());
                }
                _ => {
                    return Err(SharesError::InsidePartialShare {
                        inner: unit.named,
                        outer: outer.guest.clone(),
                    })
                }
            }
            if outer.readonly == unit.readonly {
                // The outer share now serves the whole directory with the same access.
                continue;
            }
            kept.push(unit);
            continue;
        }
        if outer.readonly == unit.readonly {
            continue;
        }
        if unit.allow.is_some() {
            return Err(SharesError::WritableFileInsideReadOnly {
                inner: unit.named,
                outer: outer.guest.clone(),
            });
        }
        kept.push(unit);
    }
    Ok(kept)
}

/// The host paths a share rooted at `host` must hide: the policy's denied paths inside it
/// (below nested shares too), and the secrets that are never shared.
fn denied_inside(view: &FsView, host: &Path, system_root: Option<&Path>) -> Vec<PathBuf> {
    let mut denied: BTreeSet<PathBuf> = view
        .entries
        .iter()
        .filter(|e| e.access == Access::Denied && e.path != host && e.path.starts_with(host))
        .map(|e| e.path.clone())
        .collect();
    let roots = [Some(Path::new("/")), system_root];
    for root in roots.into_iter().flatten() {
        for secret in never_shared() {
            let path = root.join(secret);
            if path != host && path.starts_with(host) {
                denied.insert(path);
            }
        }
    }
    // The device needs a denied path's parent directory to exist; a name under a
    // missing directory cannot be hidden (the process tier cannot mask it either).
    denied
        .into_iter()
        .filter(|p| p.parent().is_some_and(Path::is_dir))
        .collect()
}

/// The host's cwd when the policy grants it, else the first read-write directory.
fn default_cwd(view: &FsView, host_cwd: Option<&Path>) -> Option<PathBuf> {
    if let Some(cwd) = host_cwd {
        let granted = view.entries.iter().any(|e| {
            e.is_dir && e.exists && e.access != Access::Denied && cwd.starts_with(&e.path)
        });
        if granted && view.access_for(cwd) != Access::Denied {
            return Some(cwd.to_path_buf());
        }
    }
    crate::view::first_rw_dir(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Origin, ViewEntry};

    fn entry(path: &str, access: Access, is_dir: bool) -> ViewEntry {
        ViewEntry {
            path: path.into(),
            access,
            exists: true,
            is_dir,
            origins: vec![Origin::Flag("test".into())],
        }
    }

    fn view(entries: Vec<ViewEntry>) -> FsView {
        let mut entries = entries;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        FsView {
            entries,
            warnings: vec![],
        }
    }

    fn user_plan(entries: Vec<ViewEntry>) -> Result<GuestFiles, SharesError> {
        plan(&view(entries), &SystemView::None, None)
    }

    fn summary(files: &GuestFiles) -> Vec<String> {
        files
            .shares
            .iter()
            .map(|s| {
                format!(
                    "{} {} {}{}",
                    s.tag,
                    s.guest_path.display(),
                    if s.readonly { "ro" } else { "rw" },
                    s.root_allowlist
                        .as_ref()
                        .map(|a| format!(" only {}", a.join(",")))
                        .unwrap_or_default()
                )
            })
            .collect()
    }

    #[test]
    fn a_directory_is_a_share_with_the_denied_paths_inside_it() {
        let files = user_plan(vec![
            entry("/tmp", Access::ReadWrite, true),
            entry("/tmp/.env", Access::Denied, false),
            entry("/var/secret", Access::Denied, true),
        ])
        .unwrap();

        assert_eq!(summary(&files), ["mxcfs0 /tmp rw"]);
        assert_eq!(files.shares[0].denied, [PathBuf::from("/tmp/.env")]);
        assert_eq!(files.default_cwd, Some(PathBuf::from("/tmp")));
    }

    #[test]
    fn files_share_their_directory_with_only_their_names() {
        let files = user_plan(vec![
            entry("/srv/a.conf", Access::ReadOnly, false),
            entry("/srv/b.conf", Access::ReadOnly, false),
        ])
        .unwrap();

        assert_eq!(summary(&files), ["mxcfs0 /srv ro only a.conf,b.conf"]);
    }

    #[test]
    fn files_of_one_directory_with_different_access_are_refused() {
        let err = user_plan(vec![
            entry("/srv/a.conf", Access::ReadOnly, false),
            entry("/srv/b.conf", Access::ReadWrite, false),
        ])
        .unwrap_err();

        assert!(
            matches!(&err, SharesError::MixedAccess(p) if p.as_path() == Path::new("/srv")),
            "{err}"
        );
    }

    #[test]
    fn read_write_inside_read_only_is_a_second_share() {
        let files = user_plan(vec![
            entry("/w", Access::ReadOnly, true),
            entry("/w/out", Access::ReadWrite, true),
        ])
        .unwrap();

        assert_eq!(summary(&files), ["mxcfs0 /w ro", "mxcfs1 /w/out rw"]);
    }

    #[test]
    fn read_only_inside_read_write_is_refused() {
        let err = user_plan(vec![
            entry("/w", Access::ReadWrite, true),
            entry("/w/docs", Access::ReadOnly, true),
        ])
        .unwrap_err();

        assert!(matches!(err, SharesError::ReadOnlyInsideReadWrite { .. }));
    }

    /// A temporary directory with `dirs` made inside; removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(dirs: &[&str]) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let root = std::env::temp_dir().join(format!("shares-{}-{nanos}", std::process::id()));
            for d in dirs {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            Self(root)
        }

        fn at(&self, rel: &str) -> String {
            self.0.join(rel).display().to_string()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn same_access_inside_needs_no_second_share_but_keeps_its_denials() {
        let t = Tree::new(&["w/sub"]);
        let files = user_plan(vec![
            entry(&t.at("w"), Access::ReadOnly, true),
            entry(&t.at("w/sub"), Access::ReadOnly, true),
            entry(&t.at("w/sub/key"), Access::Denied, false),
            entry(&t.at("w/sub/x.txt"), Access::ReadOnly, false),
        ])
        .unwrap();

        assert_eq!(files.shares.len(), 1);
        assert_eq!(files.shares[0].guest_path, PathBuf::from(t.at("w")));
        assert_eq!(files.shares[0].denied, [PathBuf::from(t.at("w/sub/key"))]);
    }

    #[test]
    fn a_directory_inside_a_files_directory_is_shown_by_name() {
        let t = Tree::new(&["home/project"]);
        let files = user_plan(vec![
            entry(&t.at("home/.gitconfig"), Access::ReadOnly, false),
            entry(&t.at("home/project"), Access::ReadWrite, true),
            entry(&t.at("home/project/.env"), Access::Denied, false),
        ])
        .unwrap();

        let listed: Vec<String> = summary(&files)
            .iter()
            .map(|s| s.replace(&t.at(""), "/"))
            .collect();

        assert_eq!(
            listed,
            [
                "mxcfs0 /home ro only .gitconfig,project",
                "mxcfs1 /home/project rw"
            ]
        );
        // Unmounting the inner share in the guest shows the project read-only, without
        // its denied file.
        assert_eq!(
            files.shares[0].denied,
            [PathBuf::from(t.at("home/project/.env"))]
        );
    }

    #[test]
    fn anything_deeper_inside_a_files_directory_is_refused() {
        let err = user_plan(vec![
            entry("/home/.gitconfig", Access::ReadOnly, false),
            entry("/home/u/project", Access::ReadWrite, true),
        ])
        .unwrap_err();

        assert!(matches!(err, SharesError::InsidePartialShare { .. }));
    }

    #[test]
    fn a_writable_file_inside_a_read_only_directory_is_refused() {
        let err = user_plan(vec![
            entry("/w", Access::ReadOnly, true),
            entry("/w/sub/out.txt", Access::ReadWrite, false),
        ])
        .unwrap_err();

        assert!(matches!(
            err,
            SharesError::WritableFileInsideReadOnly { .. }
        ));
    }

    #[test]
    fn pseudo_file_systems_root_and_secrets_are_refused() {
        let cases = [
            "/proc",
            "/sys/kernel",
            "/dev",
            "/",
            "/etc/shadow",
            "/etc/ssh",
        ];

        let errors: Vec<SharesError> = cases
            .iter()
            .map(|p| user_plan(vec![entry(p, Access::ReadOnly, true)]).unwrap_err())
            .collect();

        assert!(errors[..4]
            .iter()
            .all(|e| matches!(e, SharesError::NotShareable(_))));
        assert!(errors[4..]
            .iter()
            .all(|e| matches!(e, SharesError::Secret(_))));
    }

    #[test]
    fn a_file_directly_in_the_root_is_refused() {
        let err = user_plan(vec![entry("/vmlinuz", Access::ReadOnly, false)]).unwrap_err();

        assert!(
            matches!(&err, SharesError::NotShareable(p) if p.as_path() == Path::new("/")),
            "{err}"
        );
    }

    #[test]
    fn a_system_directory_the_policy_denies_is_not_shared() {
        let files = plan(
            &view(vec![entry("/etc", Access::Denied, true)]),
            &SystemView::Host,
            None,
        )
        .unwrap();

        assert!(files
            .shares
            .iter()
            .all(|s| s.guest_path != Path::new("/etc")));
        assert!(files
            .shares
            .iter()
            .any(|s| s.guest_path == Path::new("/usr")));
    }

    #[test]
    fn a_share_containing_etc_hides_its_secrets() {
        let files = user_plan(vec![entry("/etc", Access::ReadOnly, true)]).unwrap();

        let denied = &files.shares[0].denied;

        assert!(denied.contains(&PathBuf::from("/etc/shadow")));
        assert!(denied.contains(&PathBuf::from("/etc/ssl/private")));
    }

    #[test]
    fn the_host_system_view_shares_usr_and_part_of_etc_read_only() {
        let files = plan(&view(vec![]), &SystemView::Host, None).unwrap();

        let usr = files
            .shares
            .iter()
            .find(|s| s.guest_path == Path::new("/usr"));
        let etc = files
            .shares
            .iter()
            .find(|s| s.guest_path == Path::new("/etc"));
        let etc_names = etc.and_then(|s| s.root_allowlist.clone()).unwrap();

        assert!(usr.is_some_and(|s| s.readonly && s.root_allowlist.is_none()));
        assert!(etc.is_some_and(|s| s.readonly));
        assert!(etc_names.contains(&"passwd".to_string()));
        assert!(!etc_names.contains(&"shadow".to_string()));
        assert!(files
            .shares
            .iter()
            .all(|s| !s.guest_path.starts_with("/home") && !s.guest_path.starts_with("/root")));
        assert_eq!(files.default_cwd, None);
    }

    #[test]
    fn a_merged_usr_host_gets_its_links_in_the_guest() {
        let root = std::env::temp_dir().join(format!("shares-rootfs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let _ = std::os::unix::fs::symlink("usr/bin", root.join("bin"));

        let files = plan(&view(vec![]), &SystemView::Rootfs(root.clone()), None).unwrap();
        std::fs::remove_dir_all(&root).unwrap();

        assert_eq!(summary(&files), ["mxcfs0 /etc ro", "mxcfs1 /usr ro"]);
        assert_eq!(files.shares[1].host_path, root.join("usr"));
        assert_eq!(
            files.links,
            [GuestLink {
                path: "/bin".into(),
                target: "usr/bin".into()
            }]
        );
        assert!(files.shares[0].denied.contains(&root.join("etc/shadow")));
        assert!(!files.shares[0]
            .denied
            .contains(&root.join("etc/ssl/private")));
    }

    #[test]
    fn a_policy_share_inside_the_system_view_mounts_over_it() {
        let files = plan(
            &view(vec![entry("/usr/local/out", Access::ReadWrite, true)]),
            &SystemView::Host,
            None,
        )
        .unwrap();

        let last = summary(&files).pop();

        assert!(last.is_some_and(|s| s.ends_with("/usr/local/out rw")));
    }

    #[test]
    fn the_cwd_is_the_hosts_when_granted_else_the_first_read_write_directory() {
        let v = view(vec![
            entry("/data", Access::ReadOnly, true),
            entry("/work", Access::ReadWrite, true),
        ]);

        let inside = plan(&v, &SystemView::None, Some(Path::new("/data/sub"))).unwrap();
        let outside = plan(&v, &SystemView::None, Some(Path::new("/home/u"))).unwrap();

        assert_eq!(inside.default_cwd, Some(PathBuf::from("/data/sub")));
        assert_eq!(outside.default_cwd, Some(PathBuf::from("/work")));
    }

    #[test]
    fn the_agent_is_told_links_then_mounts() {
        let files = GuestFiles {
            shares: vec![FsShareConfig {
                tag: "mxcfs0".into(),
                host_path: "/usr".into(),
                guest_path: "/usr".into(),
                readonly: true,
                denied: vec![],
                root_allowlist: None,
                hidden_inodes: Vec::new(),
            }],
            links: vec![GuestLink {
                path: "/bin".into(),
                target: "usr/bin".into(),
            }],
            default_cwd: None,
        };

        assert_eq!(
            files.cmdline().unwrap(),
            "mxc.links=/bin:usr/bin mxc.mounts=mxcfs0:/usr:ro"
        );
    }
}

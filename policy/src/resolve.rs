//! Turns filesystem rules into the canonical view backends enforce.
//!
//! Default deny. Every rule path is made absolute and canonical (symlinks resolved,
//! dangling ones included, so a rule governs what a write would really reach). The
//! same canonical path in several rules gets the strictest access. Rule paths that are
//! the same object (same device and inode: hard links, bind mounts) get the strictest
//! access across the group, and a stricter rule below a directory that is also
//! reachable elsewhere (through another rule path, or any bind mount in the mount
//! table) is repeated there, so a bind mount cannot expose what a deny rule hides. A path that does not exist is kept with
//! `exists: false` and a warning: it grants nothing and nothing is created.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::PolicyError;
use crate::model::{Access, Filesystem, FsView, Origin, ViewEntry};

pub(crate) const ROOT_RW_MESSAGE: &str =
    "\"/\" cannot be readwrite: the sandbox could rewrite the host's whole filesystem \
     (system programs, /etc, every user's files)";
pub(crate) const ROOT_RW_HINT: &str =
    "grant the directories the command writes to, and \"/\" readonly if it must read everywhere";

/// Most symlinks followed while resolving one path (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// True when `p` is `/` once `.` and `..` are applied lexically (`/.`, `//`, `/tmp/..`).
pub(crate) fn is_root_lexically(p: &Path) -> bool {
    let mut depth: usize = 0;
    let mut absolute = false;
    for c in p.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth = depth.saturating_sub(1),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
    absolute && depth == 0
}

/// Resolves `fs` into a canonical view. Relative rule paths are joined to `base_dir`.
pub fn resolve_fs(fs: &Filesystem, base_dir: &Path) -> Result<FsView, PolicyError> {
    let base = if base_dir.is_absolute() {
        base_dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| {
                PolicyError::invalid("", format!("cannot read the current directory: {e}"))
            })?
            .join(base_dir)
    };
    let mut entries: BTreeMap<PathBuf, ViewEntry> = BTreeMap::new();
    let mut warnings = Vec::new();
    // Grants whose paths go through symlinks: (field, path, the links followed).
    let mut granted_through = Vec::new();
    for rule in &fs.rules {
        let at = origin_path(&rule.origin);
        let text = rule.path.as_os_str();
        if text.is_empty() {
            return Err(PolicyError::invalid(at, "empty path"));
        }
        if text.as_encoded_bytes().contains(&0) {
            return Err(PolicyError::invalid(at, "path contains a NUL byte"));
        }
        let abs = if rule.path.is_absolute() {
            rule.path.clone()
        } else {
            base.join(&rule.path)
        };
        let (canon, exists, links) = canonicalize_following(&abs).map_err(|m| {
            PolicyError::invalid(at.clone(), format!("cannot resolve {}: {m}", abs.display()))
        })?;
        if rule.access != Access::Denied && !links.is_empty() {
            granted_through.push((at.clone(), abs.clone(), links));
        }
        if rule.access == Access::ReadWrite && canon == Path::new("/") {
            let why = if is_root_lexically(&abs) {
                String::new()
            } else {
                format!(" ({} resolves to /)", abs.display())
            };
            return Err(
                PolicyError::invalid(at, format!("{ROOT_RW_MESSAGE}{why}")).with_hint(ROOT_RW_HINT)
            );
        }
        if !exists {
            let kept = if rule.access == Access::Denied {
                "the microVM denies it by name; the process tiers refuse it where a grant \
                 would show it"
            } else {
                "the rule is kept; nothing is created"
            };
            warnings.push(format!(
                "{}: {} does not exist ({kept})",
                rule.origin,
                canon.display(),
            ));
        }
        let is_dir = exists && std::fs::metadata(&canon).is_ok_and(|m| m.is_dir());
        let e = entries.entry(canon.clone()).or_insert_with(|| ViewEntry {
            path: canon,
            access: rule.access,
            exists,
            is_dir,
            origins: Vec::new(),
        });
        e.access = e.access.min(rule.access);
        e.origins.push(rule.origin.clone());
    }
    refuse_planted_links(&entries, &granted_through)?;
    let mut view = FsView {
        entries: entries.into_values().collect(),
        warnings,
    };
    merge_exact_aliases(&mut view);
    repeat_rules_through_aliases(&mut view);
    repeat_rules_through_mounts(&mut view);
    Ok(view)
}

/// A grant is never resolved through a symlink that sits in a read-write directory of the
/// same policy: the sandbox can write there, so an earlier run could have planted the link
/// to turn the next run's rule towards any host path (`ln -s ~/.ssh T/config`, then
/// `--ro T/config`).
fn refuse_planted_links(
    entries: &BTreeMap<PathBuf, ViewEntry>,
    granted_through: &[(String, PathBuf, Vec<PathBuf>)],
) -> Result<(), PolicyError> {
    let writable: Vec<&Path> = entries
        .values()
        .filter(|e| e.access == Access::ReadWrite && e.exists && e.is_dir)
        .map(|e| e.path.as_path())
        .collect();
    for (at, path, links) in granted_through {
        for link in links {
            let parent = link.parent().unwrap_or(link);
            if let Some(dir) = writable.iter().find(|w| parent.starts_with(w)) {
                return Err(PolicyError::invalid(
                    at.clone(),
                    format!(
                        "{} goes through the symlink {}, which is inside the read-write \
                         directory {}: the sandbox can write there, so the link may be its \
                         own; a grant is not resolved through it",
                        path.display(),
                        link.display(),
                        dir.display()
                    ),
                )
                .with_hint("name the link's target in the rule instead"));
            }
        }
    }
    Ok(())
}

fn origin_path(o: &Origin) -> String {
    match o {
        Origin::Field(f) => f.clone(),
        Origin::Flag(f) => f.clone(),
    }
}

type Key = (u64, u64);

fn key_of(p: &Path) -> Option<Key> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Rule paths naming the same object all get the strictest access among them.
fn merge_exact_aliases(view: &mut FsView) {
    let mut groups: HashMap<Key, Vec<usize>> = HashMap::new();
    for (i, e) in view.entries.iter().enumerate() {
        if let Some(k) = e.exists.then(|| key_of(&e.path)).flatten() {
            groups.entry(k).or_default().push(i);
        }
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    for group in groups {
        let strictest = group
            .iter()
            .map(|&i| view.entries[i].access)
            .min()
            .unwrap_or(Access::Denied);
        let all_origins: Vec<Origin> = group
            .iter()
            .flat_map(|&i| view.entries[i].origins.clone())
            .collect();
        let differed = group.iter().any(|&i| view.entries[i].access != strictest);
        let names: Vec<String> = group
            .iter()
            .map(|&i| view.entries[i].path.display().to_string())
            .collect();
        for &i in &group {
            let e = &mut view.entries[i];
            e.access = strictest;
            for o in &all_origins {
                if !e.origins.contains(o) {
                    e.origins.push(o.clone());
                }
            }
        }
        if differed {
            view.warnings.push(format!(
                "{} are the same file (hard link or bind mount): all get {}, the strictest",
                names.join(" and "),
                strictest.as_str()
            ));
        }
    }
}

/// A rule below directory D, where D is also reachable as another rule path A (a bind
/// mount), is repeated below A when it is stricter than what A's subtree would give.
fn repeat_rules_through_aliases(view: &mut FsView) {
    let mut dirs: HashMap<Key, Vec<PathBuf>> = HashMap::new();
    for e in view.entries.iter().filter(|e| e.exists && e.is_dir) {
        if let Some(k) = key_of(&e.path) {
            dirs.entry(k).or_default().push(e.path.clone());
        }
    }
    let mut added: Vec<ViewEntry> = Vec::new();
    for e in view.entries.iter().filter(|e| e.exists) {
        for d in e.path.ancestors().skip(1) {
            let Some(aliases) = key_of(d).and_then(|k| dirs.get(&k)) else {
                continue;
            };
            let Ok(rest) = e.path.strip_prefix(d) else {
                continue;
            };
            for a in aliases.iter().filter(|a| a.as_path() != d) {
                let there = a.join(rest);
                let known = view.entries.iter().chain(&added).any(|x| x.path == there);
                if known || e.access >= view.access_for(&there) {
                    continue;
                }
                view.warnings.push(format!(
                    "{} is also reachable as {} ({} is the same directory as {}): it gets {} \
                     there too",
                    e.path.display(),
                    there.display(),
                    a.display(),
                    d.display(),
                    e.access.as_str()
                ));
                added.push(ViewEntry {
                    path: there,
                    access: e.access,
                    exists: true,
                    is_dir: e.is_dir,
                    origins: e.origins.clone(),
                });
            }
        }
    }
    if !added.is_empty() {
        view.entries.extend(added);
        view.entries.sort_by(|a, b| a.path.cmp(&b.path));
    }
}

/// One line of /proc/self/mountinfo: which part (`root`) of which filesystem (`dev`)
/// is visible at `mount_point`.
#[derive(Debug)]
struct Mount {
    dev: String,
    root: PathBuf,
    mount_point: PathBuf,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (_id, _parent) = (f.next()?, f.next()?);
            let dev = f.next()?.to_string();
            let root = unescape_mountinfo(f.next()?);
            let mount_point = unescape_mountinfo(f.next()?);
            Some(Mount {
                dev,
                root,
                mount_point,
            })
        })
        .collect()
}

/// A stricter rule is repeated wherever the mount table shows the same object again
/// (a bind mount that no rule names, e.g. a granted home directory holding a bind
/// mount of a denied directory). Each candidate is confirmed by device and inode.
fn repeat_rules_through_mounts(view: &mut FsView) {
    let text = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => {
            view.warnings.push(format!(
                "cannot read /proc/self/mountinfo ({e}): bind mounts that no rule names were \
                 not checked for aliases"
            ));
            return;
        }
    };
    let mounts = parse_mountinfo(&text);
    let mut added: Vec<ViewEntry> = Vec::new();
    for e in view.entries.iter().filter(|e| e.exists) {
        // The mount holding e (the last, i.e. topmost, with the longest mount point).
        let Some(home) = mounts
            .iter()
            .filter(|m| e.path.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.components().count())
        else {
            continue;
        };
        let Ok(inner) = e.path.strip_prefix(&home.mount_point) else {
            continue;
        };
        let in_fs = home.root.join(inner);
        let want = key_of(&e.path);
        for m in mounts.iter().filter(|m| m.dev == home.dev) {
            let Ok(rest) = in_fs.strip_prefix(&m.root) else {
                continue;
            };
            let there = m.mount_point.join(rest);
            let known = view.entries.iter().chain(&added).any(|x| x.path == there);
            if known || e.access >= view.access_for(&there) || key_of(&there) != want {
                continue;
            }
            view.warnings.push(format!(
                "{} is also reachable as {} (a bind mount of the same directory): it gets {} \
                 there too",
                e.path.display(),
                there.display(),
                e.access.as_str()
            ));
            added.push(ViewEntry {
                path: there,
                access: e.access,
                exists: true,
                is_dir: e.is_dir,
                origins: e.origins.clone(),
            });
        }
    }
    if !added.is_empty() {
        view.entries.extend(added);
        view.entries.sort_by(|a, b| a.path.cmp(&b.path));
    }
}

/// Resolves every symlink in `path` (absolute), including a dangling last one, and
/// applies `..` to the resolved prefix. Returns the canonical path, whether it exists,
/// and every symlink followed (its own path, whose parent is canonical); once a
/// component is missing, the rest is joined lexically.
fn canonicalize_following(path: &Path) -> Result<(PathBuf, bool, Vec<PathBuf>), String> {
    let mut links = Vec::new();
    let mut todo: VecDeque<OsString> = parts(path);
    let mut out = PathBuf::from("/");
    let mut hops = 0;
    let mut missing = false;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            out.pop();
            continue;
        }
        let cand = out.join(&c);
        if missing {
            out = cand;
            continue;
        }
        match std::fs::symlink_metadata(&cand) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err("too many levels of symbolic links".into());
                }
                let target = std::fs::read_link(&cand).map_err(|e| e.to_string())?;
                links.push(cand);
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                for part in parts(&target).into_iter().rev() {
                    todo.push_front(part);
                }
            }
            Ok(md) => {
                missing = !md.is_dir() && !todo.is_empty();
                out = cand;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                missing = true;
                out = cand;
            }
            Err(e) => return Err(format!("cannot inspect {}: {e}", cand.display())),
        }
    }
    Ok((out, !missing, links))
}

/// Normal and `..` components of a path, as strings (root and `.` dropped).
fn parts(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 98:0 / / rw - ext3 /dev/root rw\n";

        let mounts = parse_mountinfo(text);

        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].dev, "98:0");
        assert_eq!(mounts[0].root, PathBuf::from("/mnt1"));
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/parent dir"));
        assert_eq!(mounts[1].mount_point, PathBuf::from("/"));
    }

    #[test]
    fn root_is_detected_lexically() {
        for p in ["/", "//", "/.", "/tmp/..", "/a/b/../.."] {
            assert!(is_root_lexically(Path::new(p)), "{p}");
        }
        for p in ["/tmp", "relative", "/a/../b", ".."] {
            assert!(!is_root_lexically(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn lenient_canonicalization_keeps_missing_tails() {
        let (p, exists, _) =
            canonicalize_following(Path::new("/definitely-missing-x/a/../b/./c")).unwrap();

        assert_eq!(p, PathBuf::from("/definitely-missing-x/b/c"));
        assert!(!exists);
    }

    #[test]
    fn lenient_canonicalization_of_existing_paths_matches_std() {
        let (p, exists, _) = canonicalize_following(Path::new("/proc/self/../self")).unwrap();

        assert_eq!(p, std::fs::canonicalize("/proc/self").unwrap());
        assert!(exists);
    }
}

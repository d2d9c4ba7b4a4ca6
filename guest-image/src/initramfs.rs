//! The guest's initramfs: a fixed directory skeleton, device nodes, `/init` (the static
//! guest agent), busybox with a few applet links and the list of its applets, and
//! minimal `/etc` files, written as a deterministic cpio newc archive (sorted, fixed
//! owners and mtimes).
//!
//! Busybox itself lives in `/.mxc/bin/busybox`, a directory never shadowed by a share,
//! so `/.mxc/bin/busybox APPLET` works whatever is shared. Under kvm_pvm every initramfs
//! entry costs the emulated kernel ~13 ms of each cold boot (all 269 applet links: 3.6 s
//! of a 13.6 s boot to agent ready), so the image links only `/bin/sh` and
//! `/usr/bin/env` (for `sh -c` and `#!` lines) and lists the applets' names in
//! `/.mxc/applets`: the agent runs a command by one of those names through busybox when
//! no `PATH` entry has it, and busybox's shell runs its applets by itself. When the
//! host's `/usr`, `/bin`, … are shared, the agent mounts them over the image's
//! directories. `/init` is the agent.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::cpio::{CpioError, CpioWriter, Meta};

/// Where busybox lives in the image (its applet links point there) and the list of its
/// applets, both in the guest's private directory, which no share covers.
pub use proto::{APPLET_LIST_PATH, BUSYBOX_PATH};
/// Changes whenever the layout of the image changes (part of its cache key).
pub const LAYOUT_VERSION: &str = "mxc-bin-4";
/// The applets the image links (when busybox has them): a shell for `sh -c` and
/// `#!/bin/sh`, `env` for `#!/usr/bin/env`.
pub const LINKED_APPLETS: &[&str] = &["bin/sh", "usr/bin/env"];

/// Directories every image has, besides the parents of the files in it.
const DIRECTORIES: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n";

/// Errors while assembling the initramfs.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// Writing the archive failed.
    #[error("cannot write the initramfs")]
    Cpio(#[from] CpioError),
    /// `busybox --list-full` could not be run.
    #[error("cannot run {path} --list-full")]
    ListApplets {
        /// The busybox binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `busybox --list-full` failed or printed something unusable.
    #[error("{path} --list-full gave no usable applet list")]
    BadAppletList {
        /// The busybox binary.
        path: PathBuf,
    },
    /// An applet path that is not a plain relative path.
    #[error("busybox applet path {0:?} is not a plain relative path")]
    BadAppletPath(String),
}

/// What goes into an image besides the fixed skeleton.
#[derive(Debug, Clone, Default)]
pub struct InitramfsContents<'a> {
    /// The `/init` program (the static guest agent).
    pub init: &'a [u8],
    /// Busybox bytes, stored at [`BUSYBOX_PATH`].
    pub busybox: Option<&'a [u8]>,
    /// Applet paths relative to `/` (from `busybox --list-full`), linked to busybox.
    pub applets: Vec<String>,
    /// Extra regular files: path relative to `/`, permission bits, bytes.
    pub extra_files: Vec<(String, u32, Vec<u8>)>,
}

#[derive(Debug, Clone)]
enum Node<'a> {
    Dir(u32),
    File(u32, &'a [u8]),
    Symlink(String),
    CharDev(u32, u32, u32),
}

/// Runs `busybox --list-full` and returns its applet paths (sorted, validated).
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, InitramfsError> {
    let output = Command::new(busybox)
        .arg("--list-full")
        .env_clear()
        .output()
        .map_err(|source| InitramfsError::ListApplets {
            path: busybox.to_owned(),
            source,
        })?;
    let bad = || InitramfsError::BadAppletList {
        path: busybox.to_owned(),
    };
    if !output.status.success() {
        return Err(bad());
    }
    let text = String::from_utf8(output.stdout).map_err(|_| bad())?;
    let mut applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if applets.is_empty() {
        return Err(bad());
    }
    for applet in &applets {
        check_relative(applet)?;
    }
    applets.sort();
    applets.dedup();
    Ok(applets)
}

fn check_relative(path: &str) -> Result<(), InitramfsError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(InitramfsError::BadAppletPath(path.to_owned()));
    }
    Ok(())
}

/// The contents of [`APPLET_LIST_PATH`]: each applet's name once, sorted, one per line.
fn applet_names(applets: &[String]) -> String {
    let names: std::collections::BTreeSet<&str> = applets
        .iter()
        .filter_map(|applet| applet.rsplit('/').next())
        .collect();
    names.into_iter().map(|name| format!("{name}\n")).collect()
}

fn add_parents<'a>(nodes: &mut BTreeMap<String, Node<'a>>, path: &str) {
    let mut end = 0;
    while let Some(slash) = path[end..].find('/') {
        end += slash;
        nodes
            .entry(path[..end].to_owned())
            .or_insert(Node::Dir(0o755));
        end += 1;
    }
}

/// Writes the initramfs for `contents` to `out` and returns `out`.
pub fn write_initramfs<W: Write>(
    out: W,
    contents: &InitramfsContents<'_>,
) -> Result<W, InitramfsError> {
    let names = applet_names(&contents.applets);
    let mut nodes: BTreeMap<String, Node<'_>> = BTreeMap::new();
    for (dir, mode) in DIRECTORIES {
        nodes.insert((*dir).to_owned(), Node::Dir(*mode));
    }
    nodes.insert("dev/console".into(), Node::CharDev(0o600, 5, 1));
    nodes.insert("dev/null".into(), Node::CharDev(0o666, 1, 3));
    nodes.insert("etc/passwd".into(), Node::File(0o644, PASSWD.as_bytes()));
    nodes.insert("etc/group".into(), Node::File(0o644, GROUP.as_bytes()));
    nodes.insert("etc/hosts".into(), Node::File(0o644, HOSTS.as_bytes()));
    if let Some(busybox) = contents.busybox {
        for applet in &contents.applets {
            check_relative(applet)?;
            if LINKED_APPLETS.contains(&applet.as_str()) {
                add_parents(&mut nodes, applet);
                // Never let an applet link replace a real file or directory.
                nodes
                    .entry(applet.clone())
                    .or_insert_with(|| Node::Symlink(BUSYBOX_PATH.to_owned()));
            }
        }
        let busybox_rel = BUSYBOX_PATH.trim_start_matches('/');
        add_parents(&mut nodes, busybox_rel);
        nodes.insert(busybox_rel.to_owned(), Node::File(0o755, busybox));
        let list_rel = APPLET_LIST_PATH.trim_start_matches('/');
        add_parents(&mut nodes, list_rel);
        nodes.insert(list_rel.to_owned(), Node::File(0o644, names.as_bytes()));
    }
    for (path, mode, data) in &contents.extra_files {
        check_relative(path)?;
        add_parents(&mut nodes, path);
        nodes.insert(path.clone(), Node::File(*mode, data));
    }
    nodes.insert("init".into(), Node::File(0o755, contents.init));

    let mut writer = CpioWriter::new(out);
    let meta = |mode| Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
    };
    for (path, node) in &nodes {
        match node {
            Node::Dir(mode) => writer.directory(path, meta(*mode))?,
            Node::File(mode, data) => writer.file(path, meta(*mode), data)?,
            Node::Symlink(target) => writer.symlink(path, meta(0o777), target)?,
            Node::CharDev(mode, major, minor) => {
                writer.char_device(path, meta(*mode), *major, *minor)?
            }
        }
    }
    Ok(writer.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::reader::{parse, Entry};
    use crate::cpio::{S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};

    fn build(contents: &InitramfsContents<'_>) -> Vec<Entry> {
        let bytes = write_initramfs(Vec::new(), contents).unwrap_or_default();
        parse(&bytes).unwrap_or_default()
    }

    fn find<'e>(entries: &'e [Entry], name: &str) -> Option<&'e Entry> {
        entries.iter().find(|e| e.name == name)
    }

    fn sample() -> InitramfsContents<'static> {
        InitramfsContents {
            init: b"\x7fELF agent",
            busybox: Some(b"\x7fELF busybox"),
            applets: vec![
                "bin/sh".into(),
                "usr/bin/awk".into(),
                "usr/bin/env".into(),
                "usr/local/bin/x".into(),
            ],
            extra_files: vec![],
        }
    }

    #[test]
    fn init_is_the_agent_and_executable() {
        let entries = build(&sample());

        let init = find(&entries, "init");

        assert_eq!(init.map(|e| e.mode), Some(S_IFREG | 0o755));
        assert_eq!(
            init.map(|e| e.data.as_slice()),
            Some(b"\x7fELF agent".as_slice())
        );
    }

    #[test]
    fn skeleton_directories_exist() {
        let entries = build(&sample());

        let missing: Vec<&str> = [
            "proc", "sys", "dev", "tmp", "mnt", "run", "etc", "bin", "sbin", "usr/bin", "usr/sbin",
            "root", "var",
        ]
        .into_iter()
        .filter(|d| find(&entries, d).map(|e| e.mode & 0o170000) != Some(S_IFDIR))
        .collect();

        assert!(missing.is_empty(), "missing directories: {missing:?}");
        assert_eq!(
            find(&entries, "tmp").map(|e| e.mode),
            Some(S_IFDIR | 0o1777)
        );
    }

    #[test]
    fn console_and_null_are_char_devices() {
        let entries = build(&sample());

        let console = find(&entries, "dev/console");
        let null = find(&entries, "dev/null");

        assert_eq!(
            console.map(|e| (e.mode, e.rdev)),
            Some((S_IFCHR | 0o600, (5, 1)))
        );
        assert_eq!(
            null.map(|e| (e.mode, e.rdev)),
            Some((S_IFCHR | 0o666, (1, 3)))
        );
    }

    #[test]
    fn only_the_shell_and_env_are_linked_and_every_applet_is_listed() {
        let entries = build(&sample());

        let sh = find(&entries, "bin/sh");
        let list = find(&entries, ".mxc/applets");

        assert_eq!(sh.map(|e| e.mode), Some(S_IFLNK | 0o777));
        assert_eq!(
            sh.map(|e| e.data.as_slice()),
            Some(b"/.mxc/bin/busybox".as_slice())
        );
        assert_eq!(
            find(&entries, "usr/bin/env").map(|e| e.data.as_slice()),
            Some(b"/.mxc/bin/busybox".as_slice())
        );
        assert!(find(&entries, "usr/bin/awk").is_none());
        assert!(find(&entries, "usr/local/bin/x").is_none());
        assert!(find(&entries, "bin/busybox").is_none());
        assert_eq!(
            find(&entries, ".mxc/bin/busybox").map(|e| e.mode),
            Some(S_IFREG | 0o755)
        );
        assert_eq!(list.map(|e| e.mode), Some(S_IFREG | 0o644));
        assert_eq!(
            list.map(|e| String::from_utf8_lossy(&e.data).into_owned()),
            Some("awk\nenv\nsh\nx\n".to_owned())
        );
    }

    #[test]
    fn entries_are_sorted_with_parents_first_and_trailer_last() {
        let entries = build(&sample());

        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let body = &names[..names.len() - 1];

        assert!(body.windows(2).all(|w| w[0] < w[1]), "not sorted: {body:?}");
        assert_eq!(names.last(), Some(&"TRAILER!!!"));
    }

    #[test]
    fn metadata_is_fixed() {
        let entries = build(&sample());

        assert!(entries
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 0));
    }

    #[test]
    fn output_is_deterministic() {
        let first = write_initramfs(Vec::new(), &sample()).unwrap_or_default();

        let second = write_initramfs(Vec::new(), &sample()).unwrap_or_default();

        assert!(!first.is_empty());
        assert_eq!(first, second);
    }

    #[test]
    fn passwd_and_group_have_root_and_nobody() {
        let entries = build(&sample());

        let passwd =
            find(&entries, "etc/passwd").map(|e| String::from_utf8_lossy(&e.data).into_owned());
        let group =
            find(&entries, "etc/group").map(|e| String::from_utf8_lossy(&e.data).into_owned());

        assert!(passwd.as_deref().unwrap_or("").starts_with("root:x:0:0:"));
        assert!(passwd
            .as_deref()
            .unwrap_or("")
            .contains("\nnobody:x:65534:65534:"));
        assert!(group.as_deref().unwrap_or("").starts_with("root:x:0:"));
    }

    #[test]
    fn applet_named_init_does_not_replace_the_agent() {
        let contents = InitramfsContents {
            applets: vec!["init".into()],
            ..sample()
        };

        let entries = build(&contents);

        assert_eq!(
            find(&entries, "init").map(|e| e.mode),
            Some(S_IFREG | 0o755)
        );
    }

    #[test]
    fn escaping_applet_path_is_refused() {
        let contents = InitramfsContents {
            applets: vec!["../etc/x".into()],
            ..sample()
        };

        let result = write_initramfs(Vec::new(), &contents);

        assert!(matches!(result, Err(InitramfsError::BadAppletPath(_))));
    }

    #[test]
    fn host_busybox_lists_its_applets() {
        let applets = busybox_applets(Path::new("/bin/busybox")).unwrap_or_default();

        assert!(
            applets.iter().any(|a| a == "bin/sh"),
            "busybox-static must be installed"
        );
        assert!(applets.iter().all(|a| !a.starts_with('/')));
    }
}

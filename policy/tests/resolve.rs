//! Filesystem resolution on real directories, symlinks, hard links and bind mounts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TempDir;
use policy::{resolve_fs, Access, Filesystem, FsView, Origin, PathRule};

fn rule(path: impl Into<PathBuf>, access: Access, origin: &str) -> PathRule {
    PathRule {
        path: path.into(),
        access,
        origin: Origin::Field(origin.into()),
    }
}

fn resolve(base: &Path, rules: Vec<PathRule>) -> FsView {
    resolve_fs(&Filesystem { rules }, base).unwrap()
}

fn mkdirs(t: &TempDir, dirs: &[&str]) {
    for d in dirs {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
}

fn write(t: &TempDir, file: &str) {
    std::fs::write(t.join(file), b"x").unwrap();
}

#[test]
fn everything_is_denied_by_default() {
    let t = TempDir::new("default");

    let view = resolve(t.path(), vec![]);

    assert!(view.entries.is_empty());
    assert_eq!(view.access_for(t.path()), Access::Denied);
    assert_eq!(view.access_for(Path::new("/etc/passwd")), Access::Denied);
}

#[test]
fn relative_paths_resolve_against_the_base_and_the_most_specific_wins() {
    let t = TempDir::new("specific");
    mkdirs(&t, &["project/src"]);
    write(&t, "project/.env");

    let view = resolve(
        t.path(),
        vec![
            rule("./project", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("project/.env", Access::Denied, "filesystem.denied[0]"),
        ],
    );

    assert_eq!(view.entries.len(), 2);
    assert_eq!(view.entries[0].path, t.join("project"));
    assert!(view.entries[0].is_dir);
    assert_eq!(
        view.access_for(&t.join("project/src/main.rs")),
        Access::ReadWrite
    );
    assert_eq!(view.access_for(&t.join("project/.env")), Access::Denied);
    assert_eq!(view.access_for(&t.join("other")), Access::Denied);
    assert!(view.warnings.is_empty(), "{:?}", view.warnings);
}

#[test]
fn the_same_path_in_several_lists_gets_the_strictest_access() {
    let t = TempDir::new("strictest");
    mkdirs(&t, &["data"]);

    let view = resolve(
        t.path(),
        vec![
            rule("data", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule(t.join("data/."), Access::ReadOnly, "filesystem.readonly[0]"),
        ],
    );

    assert_eq!(view.entries.len(), 1);
    assert_eq!(view.entries[0].access, Access::ReadOnly);
    assert_eq!(
        view.entries[0].origins,
        vec![
            Origin::Field("filesystem.readwrite[0]".into()),
            Origin::Field("filesystem.readonly[0]".into())
        ]
    );
}

#[test]
fn symlinks_are_resolved_and_merge_with_their_target() {
    let t = TempDir::new("symlink");
    mkdirs(&t, &["real", "links"]);
    symlink("../real", t.join("links/rel")).unwrap();
    symlink(t.join("links/rel"), t.join("chain")).unwrap();

    let view = resolve(
        t.path(),
        vec![
            rule("chain", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("real", Access::ReadOnly, "filesystem.readonly[0]"),
        ],
    );

    assert_eq!(view.entries.len(), 1);
    assert_eq!(view.entries[0].path, t.join("real"));
    assert_eq!(view.entries[0].access, Access::ReadOnly);
}

#[test]
fn a_symlink_in_a_rw_dir_to_a_denied_file_resolves_to_the_denied_file() {
    let t = TempDir::new("leak");
    mkdirs(&t, &["project"]);
    write(&t, "secret.txt");
    symlink("../secret.txt", t.join("project/link")).unwrap();

    let view = resolve(
        t.path(),
        vec![
            rule("project", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("secret.txt", Access::Denied, "filesystem.denied[0]"),
        ],
    );

    let through_link = std::fs::canonicalize(t.join("project/link")).unwrap();
    assert_eq!(view.access_for(&through_link), Access::Denied);
}

#[test]
fn a_dangling_symlink_governs_its_target_and_warns() {
    let t = TempDir::new("dangling");
    symlink("nowhere/file", t.join("dangling")).unwrap();

    let view = resolve(
        t.path(),
        vec![rule("dangling", Access::Denied, "filesystem.denied[0]")],
    );

    assert_eq!(view.entries[0].path, t.join("nowhere/file"));
    assert!(!view.entries[0].exists);
    assert_eq!(view.warnings.len(), 1);
    assert!(view.warnings[0].contains("does not exist"));
}

#[test]
fn a_missing_path_is_kept_with_a_warning_not_granted_silently() {
    let t = TempDir::new("missing");

    let view = resolve(
        t.path(),
        vec![rule(
            "not/there",
            Access::ReadWrite,
            "filesystem.readwrite[0]",
        )],
    );

    assert_eq!(view.entries.len(), 1);
    assert!(!view.entries[0].exists);
    assert!(!view.entries[0].is_dir);
    assert_eq!(view.entries[0].path, t.join("not/there"));
    assert!(view.warnings[0].starts_with("filesystem.readwrite[0]: "));
    assert!(view.warnings[0].contains("nothing is created"));
}

#[test]
fn a_path_below_a_regular_file_is_missing() {
    let t = TempDir::new("notdir");
    write(&t, "file");

    let view = resolve(
        t.path(),
        vec![rule("file/sub", Access::ReadOnly, "filesystem.readonly[0]")],
    );

    assert!(!view.entries[0].exists);
}

#[test]
fn a_symlink_loop_is_an_error_naming_the_rule() {
    let t = TempDir::new("loop");
    symlink("b", t.join("a")).unwrap();
    symlink("a", t.join("b")).unwrap();

    let err = resolve_fs(
        &Filesystem {
            rules: vec![rule("a", Access::ReadOnly, "filesystem.readonly[3]")],
        },
        t.path(),
    )
    .unwrap_err();

    assert_eq!(err.path(), "filesystem.readonly[3]");
    assert!(err.message().contains("too many levels of symbolic links"));
}

#[test]
fn root_readwrite_through_a_symlink_is_refused() {
    let t = TempDir::new("root");
    symlink("/", t.join("up")).unwrap();

    let err = resolve_fs(
        &Filesystem {
            rules: vec![rule("up", Access::ReadWrite, "filesystem.readwrite[0]")],
        },
        t.path(),
    )
    .unwrap_err();

    assert_eq!(err.path(), "filesystem.readwrite[0]");
    assert!(err.message().contains("\"/\" cannot be readwrite"));
    assert!(err.message().contains("resolves to /"));
}

#[test]
fn root_readonly_is_allowed() {
    let view = resolve(
        Path::new("/"),
        vec![rule("/", Access::ReadOnly, "filesystem.readonly[0]")],
    );

    assert_eq!(view.access_for(Path::new("/usr/bin")), Access::ReadOnly);
}

#[test]
fn empty_and_nul_paths_are_refused() {
    let empty = resolve_fs(
        &Filesystem {
            rules: vec![rule("", Access::ReadOnly, "filesystem.readonly[0]")],
        },
        Path::new("/"),
    )
    .unwrap_err();
    let nul = resolve_fs(
        &Filesystem {
            rules: vec![rule(
                "/tmp/a\0b",
                Access::ReadOnly,
                "filesystem.readonly[1]",
            )],
        },
        Path::new("/"),
    )
    .unwrap_err();

    assert_eq!(empty.path(), "filesystem.readonly[0]");
    assert!(empty.message().contains("empty path"));
    assert_eq!(nul.path(), "filesystem.readonly[1]");
    assert!(nul.message().contains("NUL"));
}

#[test]
fn hard_links_get_the_strictest_access_of_the_group() {
    let t = TempDir::new("hardlink");
    write(&t, "a.txt");
    std::fs::hard_link(t.join("a.txt"), t.join("b.txt")).unwrap();

    let view = resolve(
        t.path(),
        vec![
            rule("a.txt", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("b.txt", Access::Denied, "filesystem.denied[0]"),
        ],
    );

    assert_eq!(view.access_for(&t.join("a.txt")), Access::Denied);
    assert_eq!(view.access_for(&t.join("b.txt")), Access::Denied);
    assert_eq!(view.entries[0].origins.len(), 2);
    assert!(view.warnings.iter().any(|w| w.contains("same file")));
}

/// Unmounts on drop (declared after the TempDir so it runs first).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Bind-mounts `src` on `dst`; None (with the reason printed) when this machine does
/// not allow it. CI runs as root, where it works.
fn bind(src: &Path, dst: &Path) -> Option<Unmount> {
    match Command::new("mount")
        .arg("--bind")
        .arg(src)
        .arg(dst)
        .output()
    {
        Ok(o) if o.status.success() => Some(Unmount(dst.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "SKIPPED bind-mount case: mount --bind failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED bind-mount case: cannot run mount: {e}");
            None
        }
    }
}

#[test]
fn bind_mounts_cannot_expose_what_a_deny_rule_hides() {
    let t = TempDir::new("bind");
    mkdirs(&t, &["data/secret", "data/pub", "mnt"]);
    let Some(_m) = bind(&t.join("data"), &t.join("mnt")) else {
        return;
    };

    let view = resolve(
        t.path(),
        vec![
            rule("mnt", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("data/secret", Access::Denied, "filesystem.denied[0]"),
        ],
    );

    assert_eq!(view.access_for(&t.join("mnt/pub")), Access::ReadWrite);
    assert_eq!(view.access_for(&t.join("mnt/secret")), Access::Denied);
    assert!(view
        .warnings
        .iter()
        .any(|w| w.contains("also reachable as")));
}

#[test]
fn bind_mount_aliases_get_the_strictest_intent() {
    let t = TempDir::new("bindalias");
    mkdirs(&t, &["data", "mnt"]);
    let Some(_m) = bind(&t.join("data"), &t.join("mnt")) else {
        return;
    };

    let view = resolve(
        t.path(),
        vec![
            rule("data", Access::ReadOnly, "filesystem.readonly[0]"),
            rule("mnt", Access::ReadWrite, "filesystem.readwrite[0]"),
        ],
    );

    assert_eq!(view.access_for(&t.join("mnt/x")), Access::ReadOnly);
    assert_eq!(view.access_for(&t.join("data/x")), Access::ReadOnly);
}

#[test]
fn a_bind_mount_no_rule_names_cannot_expose_a_denied_directory() {
    let t = TempDir::new("bindhidden");
    mkdirs(&t, &["home/u/inner", "secrets/keys"]);
    let Some(_m) = bind(&t.join("secrets"), &t.join("home/u/inner")) else {
        return;
    };

    let view = resolve(
        t.path(),
        vec![
            rule("home", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("secrets/keys", Access::Denied, "filesystem.denied[0]"),
        ],
    );

    assert_eq!(
        view.access_for(&t.join("home/u/inner/keys/k")),
        Access::Denied
    );
    assert_eq!(view.access_for(&t.join("home/u/other")), Access::ReadWrite);
}

#[test]
fn a_policy_file_resolves_relative_to_its_own_directory() {
    let t = TempDir::new("file");
    mkdirs(&t, &["proj/out"]);
    write(&t, "proj/.env");
    let file = t.join("proj/policy.json");
    std::fs::write(
        &file,
        r#"{"version": "1",
            "filesystem": {"readwrite": ["out"], "readonly": ["."], "denied": [".env"]}}"#,
    )
    .unwrap();

    let p = policy::load_file(&file).unwrap();
    let view = resolve_fs(&p.filesystem, Path::new("/unused")).unwrap();

    assert_eq!(view.access_for(&t.join("proj/out/a")), Access::ReadWrite);
    assert_eq!(view.access_for(&t.join("proj/src")), Access::ReadOnly);
    assert_eq!(view.access_for(&t.join("proj/.env")), Access::Denied);
    assert_eq!(view.access_for(&t.join("elsewhere")), Access::Denied);
}

/// The attack: an earlier run, allowed to write in `project`, replaced `project/config`
/// with a link to a host directory no rule grants; the next run's `--ro project/config`
/// must not grant that directory.
#[test]
fn a_grant_through_a_link_in_a_read_write_directory_is_refused() {
    let t = TempDir::new("planted");
    mkdirs(&t, &["project", "home/.ssh"]);
    write(&t, "home/.ssh/id_ed25519");
    symlink(t.join("home/.ssh"), t.join("project/config")).unwrap();

    let err = resolve_fs(
        &Filesystem {
            rules: vec![
                rule("project", Access::ReadWrite, "filesystem.readwrite[0]"),
                rule("project/config", Access::ReadOnly, "filesystem.readonly[0]"),
            ],
        },
        t.path(),
    )
    .unwrap_err();
    // A deny rule through such a link still resolves (it only hides more), and a link
    // outside every read-write directory is followed as before.
    symlink(t.join("home/.ssh"), t.join("ssh-link")).unwrap();
    let fine = resolve(
        t.path(),
        vec![
            rule("project", Access::ReadWrite, "filesystem.readwrite[0]"),
            rule("project/config", Access::Denied, "filesystem.denied[0]"),
            rule("ssh-link", Access::ReadOnly, "filesystem.readonly[1]"),
        ],
    );

    assert_eq!(err.path(), "filesystem.readonly[0]");
    assert!(
        err.message().contains("inside the read-write directory"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("project/config"),
        "{}",
        err.message()
    );
    assert_eq!(fine.access_for(&t.join("home/.ssh")), Access::Denied);
}

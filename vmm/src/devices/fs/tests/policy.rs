//! The policy, enforced on the host: read-only shares, denied paths, `..`, symlinks, hard
//! links, other file systems, set-ID bits, limits and credentials.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use fuse_backend_rs::abi::fuse_abi::SetattrIn;

use super::client::Listed;
use super::*;
use std::sync::Arc;

use crate::devices::fs::{Fs, FsLimits, RunAs, WriteBudget};

/// Everything about a tree that a change would show: path, type and mode, size, mtime,
/// links, owner, content checksum or link target.
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let detail = if md.is_file() {
            format!("{:x}", checksum(&std::fs::read(&p).unwrap()))
        } else if md.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::new()
        };
        out.push(format!(
            "{} {:o} {} {} {} {}:{} {}",
            p.display(),
            md.mode(),
            if md.is_dir() { 0 } else { md.size() },
            md.mtime_nsec() + md.mtime() * 1_000_000_000,
            md.nlink(),
            md.uid(),
            md.gid(),
            detail
        ));
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn names(listed: &[Listed]) -> Vec<String> {
    let mut v: Vec<String> = listed.iter().map(|l| l.name.clone()).collect();
    v.sort();
    v
}

fn small_tree(dir: &TempDir) {
    std::fs::write(dir.path("f"), b"original").unwrap();
    std::fs::create_dir(dir.path("d")).unwrap();
    std::fs::write(dir.path("d/x"), b"inner").unwrap();
    std::os::unix::fs::symlink("f", dir.path("link")).unwrap();
}

#[test]
fn every_mutation_on_a_read_only_share_fails_with_erofs_and_the_host_is_unchanged() {
    let dir = TempDir::new();
    small_tree(&dir);
    let before = snapshot(dir.root());
    let mut guest = Guest::new(&share_of(dir.root(), true, &[]));
    guest.init();
    let f = guest.lookup(1, "f").unwrap();
    let d = guest.lookup(1, "d").unwrap();
    let ro_fh = guest.open(f.nodeid, libc::O_RDONLY).unwrap();

    let results = [
        guest.open(f.nodeid, libc::O_RDWR).err(),
        guest.open(f.nodeid, libc::O_WRONLY).err(),
        guest.open(f.nodeid, libc::O_RDONLY | libc::O_TRUNC).err(),
        guest.write(f.nodeid, ro_fh, 0, b"evil").err(),
        guest.fallocate(f.nodeid, ro_fh, 1 << 20).err(),
        guest.create(1, "new", libc::O_WRONLY, 0o644).err(),
        guest
            .create(1, "f", libc::O_WRONLY | libc::O_TRUNC, 0o644)
            .err(),
        guest.mkdir(1, "newdir", 0o755).err(),
        guest.mknod(1, "fifo", libc::S_IFIFO | 0o644, 0).err(),
        guest.symlink(1, "s2", "f").err(),
        guest.link(f.nodeid, 1, "hard").err(),
        guest.unlink(1, "f").err(),
        guest.unlink(d.nodeid, "x").err(),
        guest.rmdir(1, "d").err(),
        guest.rename(1, "f", 1, "g").err(),
        guest
            .rename2(1, "f", d.nodeid, "x", libc::RENAME_EXCHANGE)
            .err(),
        guest.truncate(f.nodeid, 0).err(),
        guest.chmod(f.nodeid, 0o777).err(),
        guest.set_mtime(f.nodeid, 0).err(),
        guest.set_mtime(d.nodeid, 0).err(),
        guest.access(f.nodeid, libc::W_OK).err(),
    ];
    let still_readable = guest.read(f.nodeid, ro_fh, 0, 100).unwrap();

    assert!(
        results.iter().all(|r| *r == Some(libc::EROFS)),
        "{results:?}"
    );
    assert_eq!(still_readable, b"original");
    assert_eq!(snapshot(dir.root()), before);
}

fn denied_tree(dir: &TempDir) -> Vec<PathBuf> {
    std::fs::write(dir.path("visible.txt"), b"ok").unwrap();
    std::fs::write(dir.path("secret.txt"), b"TOP SECRET").unwrap();
    std::fs::hard_link(dir.path("secret.txt"), dir.path("innocent")).unwrap();
    std::fs::create_dir_all(dir.path("private/sub")).unwrap();
    std::fs::write(dir.path("private/sub/key"), b"KEY").unwrap();
    std::fs::hard_link(dir.path("private/sub/key"), dir.path("keycopy")).unwrap();
    std::fs::create_dir(dir.path("pub")).unwrap();
    std::fs::write(dir.path("pub/.env"), b"TOKEN=1").unwrap();
    vec![
        dir.path("secret.txt"),
        dir.path("private"),
        dir.path("pub/.env"),
        dir.path("not-yet"),
    ]
}

#[test]
fn denied_paths_are_absent_from_lookup_and_listings() {
    let dir = TempDir::new();
    let denied = denied_tree(&dir);
    let mut guest = Guest::new(&share_of(dir.root(), false, &denied));
    guest.init();

    let lookups = ["secret.txt", "private", "innocent", "keycopy", "not-yet"]
        .map(|n| guest.lookup(1, n).err());
    let pubdir = guest.lookup(1, "pub").unwrap();
    let env = guest.lookup(pubdir.nodeid, ".env").err();
    let root_list = names(&guest.list(1, false).unwrap());
    let root_plus = guest.list(1, true).unwrap();
    let pub_list = names(&guest.list(pubdir.nodeid, true).unwrap());

    assert_eq!(lookups, [Some(libc::ENOENT); 5]);
    assert_eq!(env, Some(libc::ENOENT));
    assert_eq!(root_list, ["pub", "visible.txt"]);
    assert_eq!(names(&root_plus), ["pub", "visible.txt"]);
    assert!(root_plus.iter().all(|l| l.entry.unwrap().nodeid > 1));
    assert!(pub_list.is_empty());
}

#[test]
fn a_root_allowlist_shows_only_its_names_even_ones_added_later() {
    let dir = TempDir::new();
    std::fs::write(dir.path("passwd"), b"root:x:0:0").unwrap();
    std::fs::write(dir.path("shadow"), b"root:HASH").unwrap();
    std::fs::create_dir(dir.path("ssl")).unwrap();
    std::fs::write(dir.path("ssl/cert"), b"C").unwrap();
    let share = FsShareConfig {
        root_allowlist: Some(vec!["passwd".into(), "ssl".into(), "later-ok".into()]),
        hidden_inodes: Vec::new(),
        ..share_of(dir.root(), false, &[])
    };
    let mut guest = Guest::new(&share);
    guest.init();
    std::fs::write(dir.path("made-later"), b"x").unwrap();
    std::fs::write(dir.path("later-ok"), b"y").unwrap();

    let listed = names(&guest.list(1, true).unwrap());
    let lookups = ["shadow", "made-later"].map(|n| guest.lookup(1, n).err());
    let ssl = guest.lookup(1, "ssl").unwrap();
    let cert = guest.lookup(ssl.nodeid, "cert").is_ok();
    let create = guest.mkdir(1, "new-dir", 0o755).err();

    assert_eq!(listed, ["later-ok", "passwd", "ssl"]);
    assert_eq!(lookups, [Some(libc::ENOENT); 2]);
    assert!(cert);
    assert_eq!(create, Some(libc::EACCES));
}

#[test]
fn denied_paths_cannot_be_changed_created_or_replaced() {
    let dir = TempDir::new();
    let denied = denied_tree(&dir);
    let before = snapshot(dir.root());
    let mut guest = Guest::new(&share_of(dir.root(), false, &denied));
    guest.init();
    let pubdir = guest.lookup(1, "pub").unwrap();

    let results = [
        guest.unlink(1, "secret.txt").err(),
        guest.unlink(1, "innocent").err(),
        guest.rmdir(1, "private").err(),
        guest.rename(1, "secret.txt", 1, "mine").err(),
        guest.rename(1, "visible.txt", 1, "secret.txt").err(),
        guest
            .rename2(1, "visible.txt", 1, "innocent", libc::RENAME_EXCHANGE)
            .err(),
        guest.create(1, "secret.txt", libc::O_RDWR, 0o644).err(),
        guest.create(1, "not-yet", libc::O_RDWR, 0o644).err(),
        guest
            .create(pubdir.nodeid, ".env", libc::O_RDONLY, 0o644)
            .err(),
        guest.mkdir(1, "private", 0o755).err(),
        guest.symlink(1, "not-yet", "visible.txt").err(),
        guest.mknod(1, "not-yet", libc::S_IFIFO | 0o600, 0).err(),
    ];
    let visible = guest.lookup(1, "visible.txt").unwrap();
    let linked = guest.link(visible.nodeid, 1, "not-yet").err();

    assert_eq!(
        results,
        [
            Some(libc::ENOENT),
            Some(libc::ENOENT),
            Some(libc::ENOENT),
            Some(libc::ENOENT),
            Some(libc::EACCES),
            Some(libc::EACCES),
            Some(libc::EACCES),
            Some(libc::EACCES),
            Some(libc::EACCES),
            Some(libc::EACCES),
            Some(libc::EACCES),
            Some(libc::EACCES),
        ]
    );
    assert_eq!(linked, Some(libc::EACCES));
    assert_eq!(snapshot(dir.root()), before);
}

#[test]
fn denied_files_stay_hidden_when_the_host_replaces_or_links_them() {
    let dir = TempDir::new();
    let denied = denied_tree(&dir);
    let mut guest = Guest::new(&share_of(dir.root(), false, &denied));
    guest.init();

    // An editor saves by writing a new file and renaming it over the old one.
    std::fs::write(dir.path("tmp-save"), b"NEW SECRET").unwrap();
    std::fs::rename(dir.path("tmp-save"), dir.path("secret.txt")).unwrap();
    std::fs::write(dir.path("not-yet"), b"appeared later").unwrap();
    std::fs::hard_link(dir.path("innocent"), dir.path("later-link")).unwrap();
    let replaced = guest.lookup(1, "secret.txt").err();
    let appeared = guest.lookup(1, "not-yet").err();
    let later_link = guest.lookup(1, "later-link").err();
    let listed = names(&guest.list(1, true).unwrap());

    assert_eq!(replaced, Some(libc::ENOENT));
    assert_eq!(appeared, Some(libc::ENOENT));
    assert_eq!(later_link, Some(libc::ENOENT));
    assert_eq!(listed, ["pub", "visible.txt"]);
}

#[test]
fn dot_dot_and_slashes_never_leave_the_root() {
    let dir = TempDir::new();
    small_tree(&dir);
    std::os::unix::fs::symlink("..", dir.path("d/up")).unwrap();
    let mut guest = Guest::new(&share_of(&dir.path("d"), false, &[]));
    guest.init();

    let lookups = ["..", ".", "../f", "x/..", "/etc", ""].map(|n| guest.lookup(1, n).err());
    let creates = [
        guest.mkdir(1, "..", 0o755).err(),
        guest.create(1, "../escape", libc::O_WRONLY, 0o644).err(),
        guest.symlink(1, "../escape", "x").err(),
        guest.rename(1, "x", 1, "../x").err(),
    ];
    let x = guest.lookup(1, "x").unwrap();
    let up = guest.lookup(1, "up").unwrap();
    let through_file = guest.lookup(x.nodeid, "..").err();
    let through_link = guest.lookup(up.nodeid, "f").err();
    let listed = names(&guest.list(1, true).unwrap());

    assert_eq!(lookups, [Some(libc::EINVAL); 6]);
    assert_eq!(creates, [Some(libc::EINVAL); 4]);
    assert_eq!(through_file, Some(libc::ENOTDIR));
    assert_eq!(through_link, Some(libc::ENOTDIR));
    assert_eq!(listed, ["up", "x"]);
    assert!(!dir.path("escape").exists());
    assert!(dir.path("d/x").exists());
}

#[test]
fn symlinks_to_outside_content_are_never_followed_by_the_server() {
    let dir = TempDir::new();
    let outside = TempDir::new();
    std::fs::write(outside.path("shadow"), b"root:$6$secret:19000").unwrap();
    std::fs::set_permissions(
        outside.path("shadow"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let shadow_before = snapshot(outside.root());
    std::os::unix::fs::symlink(outside.path("shadow"), dir.path("x")).unwrap();
    std::os::unix::fs::symlink(outside.root(), dir.path("dirlink")).unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let target = outside.path("shadow").display().to_string();

    let x = guest.lookup(1, "x").unwrap();
    let made = guest.symlink(1, "y", &target).unwrap();
    let dirlink = guest.lookup(1, "dirlink").unwrap();
    let readlink = guest.readlink(x.nodeid).unwrap();
    let results = [
        guest.open(x.nodeid, libc::O_RDONLY).err(),
        guest.open(made.nodeid, libc::O_RDWR).err(),
        guest
            .create(1, "x", libc::O_WRONLY | libc::O_TRUNC, 0o644)
            .err(),
        guest.truncate(x.nodeid, 0).err(),
        guest.lookup(dirlink.nodeid, "shadow").err(),
        guest.opendir(dirlink.nodeid).err(),
    ];
    let chmod = guest.chmod(x.nodeid, 0o777);
    let touch = guest.set_mtime(x.nodeid, 12345);

    assert_eq!(x.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(x.attr.size, target.len() as u64);
    assert_eq!(readlink, target.as_bytes());
    assert!(results.iter().all(|r| r.is_some()), "{results:?}");
    assert_eq!(results[0], Some(libc::ELOOP));
    assert_eq!(results[4], Some(libc::ENOTDIR));
    assert!(chmod.is_err());
    // Times may be set on the link itself (lutimes); the target is untouched.
    assert_eq!(touch.unwrap().attr.mtime, 12345);
    assert_eq!(snapshot(outside.root()), shadow_before);
}

#[test]
fn other_file_systems_inside_a_share_are_absent() {
    // /dev is devtmpfs with tmpfs on /dev/shm and devpts on /dev/pts.
    let dev_id = std::fs::metadata("/dev").unwrap().dev();
    let shm_id = std::fs::metadata("/dev/shm").unwrap().dev();
    assert_ne!(
        dev_id, shm_id,
        "this test needs /dev/shm to be its own mount"
    );
    let mut guest = Guest::new(&share_of(Path::new("/dev"), true, &[]));
    guest.init();

    let shm = guest.lookup(1, "shm").err();
    let pts = guest.lookup(1, "pts").err();
    let listed = names(&guest.list(1, true).unwrap());
    let null = guest.lookup(1, "null").unwrap();
    let open_null = guest.open(null.nodeid, libc::O_RDONLY).err();

    assert_eq!(shm, Some(libc::ENOENT));
    assert_eq!(pts, Some(libc::ENOENT));
    assert!(!listed.contains(&"shm".to_string()));
    assert!(!listed.contains(&"pts".to_string()));
    assert!(listed.contains(&"null".to_string()));
    assert_eq!(open_null, Some(libc::ENXIO));
}

#[test]
fn set_id_bits_and_device_nodes_are_refused() {
    let dir = TempDir::new();
    std::fs::write(dir.path("tool"), b"#!/bin/sh\n").unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();

    let (created, fh) = guest.create(1, "suid", libc::O_WRONLY, 0o4755).unwrap();
    guest.release(created.nodeid, fh).unwrap();
    let tool = guest.lookup(1, "tool").unwrap();
    guest.chmod(tool.nodeid, 0o6755).unwrap();
    guest.mkdir(1, "sgid-dir", 0o2775).unwrap();
    let chr = guest.mknod(1, "mem", libc::S_IFCHR | 0o666, 0x0101).err();
    let blk = guest.mknod(1, "sda", libc::S_IFBLK | 0o666, 0x0800).err();
    let suid_fifo = guest.mknod(1, "fifo", libc::S_IFIFO | 0o4666, 0).unwrap();

    let mode = |p: &str| std::fs::metadata(dir.path(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("tool"), 0o755);
    assert_eq!(mode("sgid-dir"), 0o775);
    assert_eq!(chr, Some(libc::EPERM));
    assert_eq!(blk, Some(libc::EPERM));
    assert_eq!(suid_fifo.attr.mode & 0o7777, 0o666);
    assert!(!dir.path("mem").exists());
}

#[test]
fn node_ids_and_handles_must_be_the_guests_own() {
    let dir = TempDir::new();
    small_tree(&dir);
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let f = guest.lookup(1, "f").unwrap();
    let d = guest.lookup(1, "d").unwrap();
    let fh = guest.open(f.nodeid, libc::O_RDONLY).unwrap();
    let dh = guest.opendir(d.nodeid).unwrap();

    let results = [
        guest.getattr(f.nodeid + 100).err(),
        guest.lookup(f.nodeid + 100, "x").err(),
        guest.lookup(f.nodeid, "x").err(),
        guest.read(d.nodeid, fh, 0, 10).err(),
        guest.read(f.nodeid, dh, 0, 10).err(),
        guest.read(f.nodeid, fh + 100, 0, 10).err(),
        guest.release(d.nodeid, fh).err(),
        guest.releasedir(f.nodeid, dh).err(),
        guest.open(d.nodeid, libc::O_RDONLY).err(),
        guest.opendir(f.nodeid).err(),
    ];

    assert_eq!(
        results,
        [
            Some(libc::EBADF),
            Some(libc::EBADF),
            Some(libc::ENOTDIR),
            Some(libc::EBADF),
            Some(libc::EBADF),
            Some(libc::EBADF),
            Some(libc::EBADF),
            Some(libc::EBADF),
            Some(libc::EISDIR),
            Some(libc::ENOTDIR),
        ]
    );
}

fn limited(max_inodes: usize, max_handles: usize) -> ServerOptions {
    ServerOptions {
        limits: FsLimits {
            max_inodes,
            max_handles,
        },
        ..ServerOptions::default()
    }
}

#[test]
fn open_handles_are_bounded() {
    let dir = TempDir::new();
    std::fs::write(dir.path("f"), b"x").unwrap();
    let mut guest = Guest::with_options(&share_of(dir.root(), false, &[]), limited(100, 3));
    guest.init();
    let f = guest.lookup(1, "f").unwrap();

    let first: Vec<u64> = (0..2)
        .map(|_| guest.open(f.nodeid, libc::O_RDONLY).unwrap())
        .collect();
    let dh = guest.opendir(1).unwrap();
    let over = guest.open(f.nodeid, libc::O_RDONLY).err();
    let over_dir = guest.opendir(1).err();
    let over_create = guest.create(1, "g", libc::O_WRONLY, 0o644).err();
    guest.release(f.nodeid, first[0]).unwrap();
    let after_release = guest.open(f.nodeid, libc::O_RDONLY);
    let usage = guest.usage();
    guest.releasedir(1, dh).unwrap();

    assert_eq!(over, Some(libc::EMFILE));
    assert_eq!(over_dir, Some(libc::EMFILE));
    assert_eq!(over_create, Some(libc::EMFILE));
    assert!(after_release.is_ok());
    assert_eq!(usage.1, 3);
    assert!(!dir.path("g").exists());
}

#[test]
fn inodes_held_by_the_guest_are_bounded() {
    let dir = TempDir::new();
    for i in 0..6 {
        std::fs::write(dir.path(&format!("f{i}")), b"x").unwrap();
    }
    let mut guest = Guest::with_options(&share_of(dir.root(), false, &[]), limited(3, 100));
    guest.init();

    let held: Vec<u64> = (0..3)
        .map(|i| guest.lookup(1, &format!("f{i}")).unwrap().nodeid)
        .collect();
    let over = guest.lookup(1, "f3").err();
    let same_again = guest.lookup(1, "f0").is_ok();
    let over_mkdir = guest.mkdir(1, "newdir", 0o755).err();
    let plus = guest.list(1, true).err();
    let count_at_limit = guest.usage().0;
    guest.forget(held[0], 100);
    let after_forget = guest.lookup(1, "f3").is_ok();

    assert_eq!(over, Some(libc::ENFILE));
    assert!(same_again);
    assert_eq!(over_mkdir, Some(libc::ENFILE));
    assert_eq!(plus, Some(libc::ENFILE));
    assert_eq!(count_at_limit, 3);
    assert!(after_forget);
    assert!(!dir.path("newdir").exists());
}

#[test]
fn the_guests_uid_is_never_adopted() {
    let dir = TempDir::new();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    guest.creds = (5555, 5556);

    let (file, fh) = guest.create(1, "mine", libc::O_WRONLY, 0o644).unwrap();
    guest.release(file.nodeid, fh).unwrap();
    guest.mkdir(1, "mydir", 0o755).unwrap();

    let (uid, gid) = crate::devices::fs::creds::current_ids().unwrap();
    let md = std::fs::metadata(dir.path("mine")).unwrap();
    let dmd = std::fs::metadata(dir.path("mydir")).unwrap();
    assert_eq!((md.uid(), md.gid()), (uid, gid));
    assert_eq!((dmd.uid(), dmd.gid()), (uid, gid));
}

#[test]
fn a_root_server_has_no_dac_override_and_run_as_serves_as_that_user() {
    assert!(is_root(), "this test needs root");
    let dir = TempDir::new();
    std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(dir.path("users"), b"user data").unwrap();
    std::fs::set_permissions(dir.path("users"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(dir.path("users"), Some(4321), Some(4321)).unwrap();
    std::fs::write(dir.path("roots"), b"root data").unwrap();
    std::fs::set_permissions(dir.path("roots"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut as_root = Guest::new(&share_of(dir.root(), false, &[]));
    let mut as_user = Guest::with_options(
        &share_of(dir.root(), false, &[]),
        ServerOptions {
            run_as: Some(RunAs {
                uid: 4321,
                gid: 4321,
            }),
            ..ServerOptions::default()
        },
    );
    as_root.init();
    as_user.init();

    let root_users = as_root.lookup(1, "users").unwrap();
    let root_roots = as_root.lookup(1, "roots").unwrap();
    let user_users = as_user.lookup(1, "users").unwrap();
    let user_roots = as_user.lookup(1, "roots").unwrap();
    let results = [
        as_root.open(root_users.nodeid, libc::O_RDONLY).err(),
        as_root.open(root_roots.nodeid, libc::O_RDONLY).err(),
        as_user.open(user_users.nodeid, libc::O_RDONLY).err(),
        as_user.open(user_roots.nodeid, libc::O_RDONLY).err(),
        as_root.chmod(root_users.nodeid, 0o644).err(),
    ];
    let (made, fh) = as_user.create(1, "made", libc::O_WRONLY, 0o644).unwrap();
    as_user.release(made.nodeid, fh).unwrap();

    assert_eq!(
        results,
        [
            Some(libc::EACCES),
            None,
            None,
            Some(libc::EACCES),
            Some(libc::EPERM)
        ]
    );
    let md = std::fs::metadata(dir.path("made")).unwrap();
    assert_eq!((md.uid(), md.gid()), (4321, 4321));
}

#[test]
fn setattr_through_a_handle_needs_the_guests_own_handle() {
    let dir = TempDir::new();
    std::fs::write(dir.path("f"), b"0123456789").unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let f = guest.lookup(1, "f").unwrap();
    let fh = guest.open(f.nodeid, libc::O_RDWR).unwrap();
    const FATTR_SIZE: u32 = 1 << 3;
    const FATTR_FH: u32 = 1 << 6;

    let good = guest.setattr(
        f.nodeid,
        SetattrIn {
            valid: FATTR_SIZE | FATTR_FH,
            fh,
            size: 4,
            ..Default::default()
        },
    );
    let forged = guest.setattr(
        f.nodeid,
        SetattrIn {
            valid: FATTR_SIZE | FATTR_FH,
            fh: fh + 7,
            size: 0,
            ..Default::default()
        },
    );

    assert_eq!(good.unwrap().attr.size, 4);
    assert_eq!(forged.err(), Some(libc::EBADF));
    assert_eq!(std::fs::read(dir.path("f")).unwrap(), b"0123");
}

/// A bind mount, undone on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> Self {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let (src, dst) = (c(source), c(target));
        // SAFETY: mount(2) with valid C strings and no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "bind mount failed: {}",
            std::io::Error::last_os_error()
        );
        Self(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let dst = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) with a valid C string.
        unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_bind_mount_of_the_same_file_system_inside_a_share_is_absent() {
    assert!(is_root(), "this test needs root to mount");
    let dir = TempDir::new();
    let outside = TempDir::new();
    std::fs::write(outside.path("secret"), b"outside the share").unwrap();
    std::fs::create_dir(dir.path("bound")).unwrap();
    std::fs::write(dir.path("visible"), b"").unwrap();
    let _mount = BindMount::new(outside.root(), &dir.path("bound"));
    let same_dev = std::fs::metadata(dir.path("bound")).unwrap().dev()
        == std::fs::metadata(dir.root()).unwrap().dev();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();

    let bound = guest.lookup(1, "bound").err();
    let listed = names(&guest.list(1, true).unwrap());
    let created = guest.mkdir(1, "bound", 0o755).err();

    assert!(same_dev);
    assert_eq!(bound, Some(libc::ENOENT));
    assert_eq!(listed, ["visible"]);
    assert_eq!(created, Some(libc::EACCES));
}

#[test]
fn create_of_an_existing_name_opens_it_or_fails_cleanly() {
    let dir = TempDir::new();
    std::fs::write(dir.path("exists"), b"keep").unwrap();
    std::fs::write(dir.path("locked"), b"no").unwrap();
    std::fs::set_permissions(dir.path("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::os::unix::fs::chown(dir.path("locked"), Some(4321), Some(4321)).unwrap();
    std::fs::create_dir(dir.path("sub")).unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();

    let (entry, fh) = guest.create(1, "exists", libc::O_RDWR, 0o600).unwrap();
    let content = guest.read(entry.nodeid, fh, 0, 100).unwrap();
    guest.release(entry.nodeid, fh).unwrap();
    guest.forget(entry.nodeid, 1);
    let exclusive = guest
        .create(1, "exists", libc::O_RDWR | libc::O_EXCL, 0o600)
        .err();
    let locked = guest.create(1, "locked", libc::O_RDWR, 0o600).err();
    let directory = guest.create(1, "sub", libc::O_RDWR, 0o600).err();

    assert!(is_root(), "the locked file needs root to set up");
    assert_eq!(content, b"keep");
    assert_eq!(exclusive, Some(libc::EEXIST));
    assert_eq!(locked, Some(libc::EACCES));
    assert_eq!(directory, Some(libc::EISDIR));
    assert_eq!(guest.usage(), (0, 0));
}

/// The attack of review hole 1: `mv /T/d /T/d2; mkdir /T/d` would leave the host's denied
/// file at `/T/d2/secret`, where the next sandbox's rule (`/T/d/secret`) no longer finds
/// it. Every directory between the share's root and a denied path stays where it is:
/// renaming, removing or replacing it is refused with `EBUSY`; other directories move.
#[test]
fn directories_above_a_denied_path_cannot_be_moved_removed_or_replaced() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path("d/deeper")).unwrap();
    std::fs::write(dir.path("d/deeper/secret"), b"s").unwrap();
    std::fs::create_dir(dir.path("waiting")).unwrap();
    std::fs::create_dir(dir.path("free")).unwrap();
    std::fs::create_dir(dir.path("spare")).unwrap();
    let denied = [dir.path("d/deeper/secret"), dir.path("waiting/later.env")];
    let before = snapshot(dir.root());
    let mut guest = Guest::new(&share_of(dir.root(), false, &denied));
    guest.init();
    let d = guest.lookup(1, "d").unwrap();

    let attacks = [
        guest.rename(1, "d", 1, "d2").err(),
        guest.rename(d.nodeid, "deeper", 1, "moved").err(),
        guest.rmdir(d.nodeid, "deeper").err(),
        guest.rmdir(1, "waiting").err(),
        guest.rename(1, "waiting", 1, "elsewhere").err(),
        guest.rename(1, "spare", 1, "waiting").err(),
        guest
            .rename2(1, "spare", 1, "d", libc::RENAME_EXCHANGE)
            .err(),
    ];
    let unchanged = snapshot(dir.root()) == before;
    let free_moves = guest.rename(1, "free", 1, "free2").err();

    assert_eq!(attacks, [Some(libc::EBUSY); 7]);
    assert!(unchanged);
    assert_eq!(free_moves, None);
    assert!(dir.path("d/deeper/secret").exists() && dir.path("free2").is_dir());
}

/// Commands in the guest run as `nobody`: the guest kernel checks permissions against the
/// owner it is shown, so the server's own files are shown as the guest user's, and other
/// owners as they are.
#[test]
fn files_the_server_owns_are_shown_as_the_guest_users() {
    assert!(is_root(), "this test needs root");
    let dir = TempDir::new();
    std::fs::write(dir.path("ours"), b"server's").unwrap();
    std::fs::write(dir.path("theirs"), b"another user's").unwrap();
    std::os::unix::fs::chown(dir.path("theirs"), Some(4321), Some(4321)).unwrap();
    let mut guest = Guest::with_options(
        &share_of(dir.root(), false, &[]),
        ServerOptions {
            guest_owner: Some(65534),
            ..ServerOptions::default()
        },
    );
    guest.init();

    let ours = guest.lookup(1, "ours").unwrap();
    let theirs = guest.lookup(1, "theirs").unwrap();
    let root = guest.getattr(1).unwrap();
    let (made, fh) = guest.create(1, "made", libc::O_WRONLY, 0o644).unwrap();
    guest.release(made.nodeid, fh).unwrap();

    assert_eq!((ours.attr.uid, ours.attr.gid), (65534, 65534));
    assert_eq!((theirs.attr.uid, theirs.attr.gid), (4321, 4321));
    assert_eq!((root.attr.uid, root.attr.gid), (65534, 65534));
    assert_eq!((made.attr.uid, made.attr.gid), (65534, 65534));
    let md = std::fs::metadata(dir.path("made")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (0, 0),
        "on the host: the server's own"
    );
}

/// `limits.diskMiB`: writes, extensions and allocations into every share of a VM take
/// from one budget; past it the guest gets ENOSPC and nothing more lands on the host.
#[test]
fn writes_past_the_budget_get_enospc_across_shares() {
    let (a, b) = (TempDir::new(), TempDir::new());
    let budget = Arc::new(WriteBudget::new(10_000));
    let mut one = Guest::activate(
        Fs::with_budget(
            &share_of(a.root(), false, &[]),
            ServerOptions::default(),
            Some(budget.clone()),
        )
        .unwrap(),
    );
    let mut two = Guest::activate(
        Fs::with_budget(
            &share_of(b.root(), false, &[]),
            ServerOptions::default(),
            Some(budget.clone()),
        )
        .unwrap(),
    );
    one.init();
    two.init();

    let (f, fh) = one.create(1, "f", libc::O_WRONLY, 0o644).unwrap();
    let first = one.write(f.nodeid, fh, 0, &[1u8; 6_000]);
    let (g, gh) = two.create(1, "g", libc::O_WRONLY, 0o644).unwrap();
    let over = two.write(g.nodeid, gh, 0, &[2u8; 5_000]).err();
    let fits = two.write(g.nodeid, gh, 0, &[2u8; 4_000]);
    let grow = one.truncate(f.nodeid, 1 << 20).err();
    let alloc = two.fallocate(g.nodeid, gh, 1 << 20).err();
    one.release(f.nodeid, fh).unwrap();
    two.release(g.nodeid, gh).unwrap();

    assert_eq!(first.unwrap(), 6_000);
    assert_eq!(over, Some(libc::ENOSPC));
    assert_eq!(fits.unwrap(), 4_000);
    assert_eq!((grow, alloc), (Some(libc::ENOSPC), Some(libc::ENOSPC)));
    assert_eq!(budget.left(), 0);
    assert_eq!(std::fs::metadata(a.path("f")).unwrap().len(), 6_000);
    assert_eq!(std::fs::metadata(b.path("g")).unwrap().len(), 4_000);
}

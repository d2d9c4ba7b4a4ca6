//! The device as the Linux driver sees it: config space, activation, INIT, reading a
//! read-only file, writing a rw share, data reaching the host, the worker's life.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;

use super::*;
use crate::devices::fs::{validate_shares, FsError, FsLimits, FS_DEVICE_TYPE};
use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_VRING};

#[test]
fn describes_itself_as_a_virtio_fs_device() {
    let dir = TempDir::new();
    let dev = Fs::new(&FsShareConfig {
        tag: "mxcfs12".into(),
        ..share_of(dir.root(), true, &[])
    })
    .unwrap();
    let mut tag = [0xffu8; 36];
    let mut queues = [0u8; 4];
    let mut straddle = [0xffu8; 8];
    let mut far = [0xffu8; 4];

    dev.read_config(0, &mut tag);
    dev.read_config(36, &mut queues);
    dev.read_config(38, &mut straddle);
    dev.read_config(u64::MAX, &mut far);

    assert_eq!(dev.device_type(), FS_DEVICE_TYPE);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    assert_eq!(dev.avail_features(), 1 << 32);
    assert_eq!(&tag[..7], b"mxcfs12");
    assert!(tag[7..].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes(queues), 1);
    assert_eq!(straddle, [0; 8]);
    assert_eq!(far, [0; 4]);
    assert_eq!(dev.tag(), "mxcfs12");
    assert!(dev.readonly());
}

#[test]
fn a_36_byte_tag_fills_the_field_without_nul() {
    let dir = TempDir::new();
    let tag = "t".repeat(36);
    let dev = Fs::new(&FsShareConfig {
        tag: tag.clone(),
        ..share_of(dir.root(), false, &[])
    })
    .unwrap();
    let mut bytes = [0u8; 36];

    dev.read_config(0, &mut bytes);

    assert_eq!(&bytes[..], tag.as_bytes());
}

#[test]
fn config_writes_are_ignored_and_features_are_masked() {
    let dir = TempDir::new();
    let mut dev = Fs::new(&share_of(dir.root(), false, &[])).unwrap();
    let mut tag = [0u8; 6];

    dev.write_config(0, b"hacked");
    dev.ack_features(u64::MAX);
    dev.read_config(0, &mut tag);

    assert_eq!(&tag, b"mxcfs0");
}

#[test]
fn activation_checks_queue_count_and_happens_once() {
    let dir = TempDir::new();
    let guest = Guest::new(&share_of(dir.root(), false, &[]));
    let irq = Arc::new(Interrupt::new(
        Arc::new(AtomicU32::new(0)),
        Arc::new(EventFd::new(0).unwrap()),
    ));
    let mut fresh = Fs::new(&share_of(dir.root(), false, &[])).unwrap();

    let twice = guest
        .dev
        .lock()
        .unwrap()
        .activate(guest.mem.clone(), irq.clone(), Vec::new());
    let short = fresh.activate(guest.mem.clone(), irq, Vec::new());

    assert!(matches!(twice, Err(ActivateError::AlreadyActive)));
    assert!(matches!(
        short,
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 0
        })
    ));
    assert!(!fresh.is_activated());
}

#[test]
fn a_queue_outside_guest_memory_fails_activation() {
    let dir = TempDir::new();
    let mut dev = Fs::new(&share_of(dir.root(), false, &[])).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(Interrupt::new(
        Arc::new(AtomicU32::new(0)),
        Arc::new(EventFd::new(0).unwrap()),
    ));
    let mut bad = DriverQueue::new(0).device_queue();
    bad.set_desc_table_address(Some(0x7000_0000), Some(0));
    let queues = vec![
        ActiveQueue {
            queue: DriverQueue::new(0).device_queue(),
            notify: EventFd::new(0).unwrap(),
        },
        ActiveQueue {
            queue: bad,
            notify: EventFd::new(0).unwrap(),
        },
    ];

    let result = dev.activate(mem, irq, queues);

    assert!(matches!(result, Err(ActivateError::Backend(_))));
}

#[test]
fn init_handshake_refuses_writeback_and_offers_big_writes() {
    let dir = TempDir::new();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));

    let out = guest.init();

    const WRITEBACK_CACHE: u32 = 0x1_0000;
    const BIG_WRITES: u32 = 0x20;
    const DO_READDIRPLUS: u32 = 0x2000;
    assert_eq!((out.major, out.minor), (7, 33));
    assert_eq!(out.flags & WRITEBACK_CACHE, 0);
    assert_ne!(out.flags & BIG_WRITES, 0);
    assert_ne!(out.flags & DO_READDIRPLUS, 0);
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(out.max_pages, 256);
    assert_ne!(
        guest.irq_status.load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING,
        0
    );
}

#[test]
fn lookup_getattr_open_read_of_a_read_only_file() {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path("src")).unwrap();
    std::fs::write(dir.path("src/main.rs"), b"fn main() {}\n").unwrap();
    let host = std::fs::metadata(dir.path("src/main.rs")).unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), true, &[]));
    guest.init();

    let src = guest.lookup(1, "src").unwrap();
    let file = guest.lookup(src.nodeid, "main.rs").unwrap();
    let attr = guest.getattr(file.nodeid).unwrap();
    let fh = guest.open(file.nodeid, libc::O_RDONLY).unwrap();
    let all = guest.read(file.nodeid, fh, 0, 4096).unwrap();
    let tail = guest.read(file.nodeid, fh, 3, 4).unwrap();
    let past_end = guest.read(file.nodeid, fh, 100, 10).unwrap();
    let released = guest.release(file.nodeid, fh);
    let again = guest.release(file.nodeid, fh);

    assert_eq!(file.attr.size, 13);
    assert_eq!(file.attr.ino, host.ino());
    assert_eq!(attr.attr.mode, host.mode());
    assert_eq!(all, b"fn main() {}\n");
    assert_eq!(tail, b"main");
    assert!(past_end.is_empty());
    assert_eq!(released, Ok(()));
    assert_eq!(again, Err(libc::EBADF));
    assert_eq!(guest.usage(), (2, 0));
}

#[test]
fn a_write_on_a_rw_share_lands_on_the_host() {
    let dir = TempDir::new();
    std::fs::write(dir.path("notes.txt"), b"old text").unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();

    let file = guest.lookup(1, "notes.txt").unwrap();
    let fh = guest.open(file.nodeid, libc::O_RDWR).unwrap();
    let written = guest.write(file.nodeid, fh, 4, b" TEXT, longer").unwrap();
    let on_host_before_release = std::fs::read(dir.path("notes.txt")).unwrap();
    let synced = guest.fsync(file.nodeid, fh);
    let flushed = guest.flush(file.nodeid, fh);
    guest.release(file.nodeid, fh).unwrap();
    let (created, cfh) = guest
        .create(1, "new.txt", libc::O_WRONLY | libc::O_EXCL, 0o644)
        .unwrap();
    guest.write(created.nodeid, cfh, 0, b"hello").unwrap();
    guest.release(created.nodeid, cfh).unwrap();

    assert_eq!(written, 13);
    assert_eq!(on_host_before_release, b"old  TEXT, longer");
    assert_eq!(synced, Ok(()));
    assert_eq!(flushed, Ok(()));
    assert_eq!(std::fs::read(dir.path("new.txt")).unwrap(), b"hello");
    let mode = std::fs::metadata(dir.path("new.txt")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o644);
}

#[test]
fn rw_share_metadata_operations_work() {
    let dir = TempDir::new();
    std::fs::write(dir.path("a"), b"12345").unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();

    let d = guest.mkdir(1, "d", 0o755).unwrap();
    let a = guest.lookup(1, "a").unwrap();
    guest.rename(1, "a", d.nodeid, "b").unwrap();
    let linked = guest.link(a.nodeid, 1, "hard").unwrap();
    let truncated = guest.truncate(a.nodeid, 2).unwrap();
    let chmodded = guest.chmod(a.nodeid, 0o600).unwrap();
    let sym = guest.symlink(1, "s", "d/b").unwrap();
    let target = guest.readlink(sym.nodeid).unwrap();
    let fifo = guest.mknod(1, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    guest.unlink(1, "hard").unwrap();
    let access = guest.access(a.nodeid, libc::R_OK | libc::W_OK);
    let statfs = guest.statfs(1).unwrap();
    let listed = guest.list(1, false).unwrap();
    let names: Vec<String> = listed.iter().map(|l| l.name.clone()).collect();
    let d_ino = listed.iter().find(|l| l.name == "d").unwrap().ino;

    assert_eq!(std::fs::read(dir.path("d/b")).unwrap(), b"12");
    assert_eq!(linked.nodeid, a.nodeid);
    assert_eq!(truncated.attr.size, 2);
    assert_eq!(chmodded.attr.mode & 0o7777, 0o600);
    assert_eq!(target, b"d/b");
    assert_eq!(fifo.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(access, Ok(()));
    assert_eq!(statfs.len(), 80);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["d", "fifo", "s"]);
    assert!(!dir.path("hard").exists());
    assert_eq!(d_ino, std::fs::metadata(dir.path("d")).unwrap().ino());
}

#[test]
fn forget_releases_the_inodes_the_guest_held() {
    let dir = TempDir::new();
    std::fs::write(dir.path("a"), b"").unwrap();
    std::fs::write(dir.path("b"), b"").unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();

    let a = guest.lookup(1, "a").unwrap();
    guest.lookup(1, "a").unwrap();
    let b = guest.lookup(1, "b").unwrap();
    let held = guest.usage().0;
    guest.forget(a.nodeid, 1);
    let after_one = guest.usage().0;
    guest.batch_forget(&[(a.nodeid, 5), (b.nodeid, 1), (12345, 1)]);
    let after_all = guest.usage().0;
    let stale = guest.getattr(a.nodeid).err();

    assert_eq!(held, 2);
    assert_eq!(after_one, 2);
    assert_eq!(after_all, 0);
    assert_eq!(stale, Some(libc::EBADF));
}

#[test]
fn destroy_releases_everything_and_a_new_init_works() {
    let dir = TempDir::new();
    std::fs::write(dir.path("a"), b"x").unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let a = guest.lookup(1, "a").unwrap();
    guest.open(a.nodeid, libc::O_RDONLY).unwrap();
    let dh = guest.opendir(1).unwrap();

    let destroy = guest.request(super::super::protocol::opcode::DESTROY, 0, &[], 16);
    let after = guest.usage();
    guest.init();
    let again = guest.lookup(1, "a");
    let old_dir_handle = guest.releasedir(1, dh);

    assert_eq!(destroy.errno, 0);
    assert_eq!(after, (0, 0));
    assert!(again.is_ok());
    assert_eq!(old_dir_handle, Err(libc::EBADF));
}

#[test]
fn fsync_makes_data_durable_before_the_reply() {
    // What the guest fsynced is on the host before the guest sees the reply: the bytes
    // are there through an independent fd, and the host's own fdatasync has nothing left.
    let dir = TempDir::new();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let (file, fh) = guest.create(1, "durable", libc::O_WRONLY, 0o644).unwrap();
    let data = pattern(256 * 1024, 3);

    guest.write(file.nodeid, fh, 0, &data).unwrap();
    let synced = guest.fsync(file.nodeid, fh);
    let on_host = std::fs::read(dir.path("durable")).unwrap();

    assert_eq!(synced, Ok(()));
    assert_eq!(checksum(&on_host), checksum(&data));
}

#[test]
fn the_worker_stops_and_the_event_loop_hears_it() {
    let dir = TempDir::new();
    let guest = Guest::new(&share_of(dir.root(), false, &[]));
    let mut em = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
    em.add_subscriber(guest.dev.clone());
    let idle = em.run_with_timeout(0).unwrap();

    guest.dev.lock().unwrap().stop_worker();
    let woke = em.run_with_timeout(2000).unwrap();

    assert_eq!(idle, 0);
    assert_eq!(woke, 1);
    assert!(guest.dev.lock().unwrap().worker_finished() || !guest.worker_alive());
}

#[test]
fn shares_are_validated_together() {
    let dir = TempDir::new();
    let a = share_of(dir.root(), false, &[]);
    let b = FsShareConfig {
        tag: "mxcfs1".into(),
        guest_path: "/other".into(),
        ..a.clone()
    };
    let same_tag = FsShareConfig {
        guest_path: "/third".into(),
        ..a.clone()
    };
    let same_path = FsShareConfig {
        tag: "mxcfs2".into(),
        ..a.clone()
    };

    let ok = validate_shares(&[a.clone(), b]);
    let dup_tag = validate_shares(&[a.clone(), same_tag]);
    let dup_path = validate_shares(&[a, same_path]);

    assert!(ok.is_ok());
    assert!(matches!(dup_tag, Err(FsError::DuplicateTag(_))));
    assert!(matches!(dup_path, Err(FsError::DuplicateGuestPath(_))));
}

#[test]
fn config_is_json_with_defaults() {
    let json = r#"{"tag":"mxcfs0","host_path":"/p","guest_path":"/p"}"#;
    let full = r#"{"tag":"mxcfs1","host_path":"/usr","guest_path":"/usr","readonly":true,"denied":["/usr/secret"]}"#;
    let unknown = r#"{"tag":"x","host_path":"/p","guest_path":"/p","rw":true}"#;
    let options = r#"{"limits":{"max_inodes":10},"run_as":{"uid":1000,"gid":1000}}"#;

    let minimal: FsShareConfig = serde_json::from_str(json).unwrap();
    let explicit: FsShareConfig = serde_json::from_str(full).unwrap();
    let refused = serde_json::from_str::<FsShareConfig>(unknown);
    let opts: ServerOptions = serde_json::from_str(options).unwrap();

    assert!(!minimal.readonly);
    assert!(minimal.denied.is_empty());
    assert!(explicit.readonly);
    assert_eq!(explicit.denied, vec![PathBuf::from("/usr/secret")]);
    assert!(refused.is_err());
    assert_eq!(
        opts.limits,
        FsLimits {
            max_inodes: 10,
            ..FsLimits::default()
        }
    );
    assert_eq!(opts.run_as.unwrap().uid, 1000);
}

#[test]
fn run_as_is_refused_unless_the_vmm_is_root() {
    let dir = TempDir::new();
    let share = share_of(dir.root(), false, &[]);
    let options = ServerOptions {
        run_as: Some(crate::devices::fs::RunAs { uid: 1, gid: 1 }),
        ..ServerOptions::default()
    };

    let as_user = std::thread::spawn(move || {
        crate::devices::fs::creds::confine_current_thread(Some(crate::devices::fs::RunAs {
            uid: 4321,
            gid: 4321,
        }))
        .unwrap();
        Fs::with_options(&share, options).map(|_| ())
    })
    .join()
    .unwrap();

    assert!(matches!(as_user, Err(FsError::RunAsNeedsRoot(4321))));
}

#[test]
fn shares_divide_the_descriptor_limit_capped_at_the_defaults() {
    let roomy = crate::devices::fs::limits_for(4, 1_048_576).unwrap();
    let tight = crate::devices::fs::limits_for(4, 20_000).unwrap();
    let too_few = crate::devices::fs::limits_for(8, 512).unwrap_err();

    assert_eq!(roomy, FsLimits::default());
    assert_eq!((tight.max_inodes, tight.max_handles), (4_319, 617));
    assert!(too_few.to_string().contains("RLIMIT_NOFILE allows 512"));
}

/// A slot serving an empty read-only placeholder, as a VM restored for a warm pool has.
fn placeholder_slot(placeholder: &TempDir) -> Guest {
    std::fs::create_dir_all(placeholder.path("empty")).unwrap();
    Guest::new(&share_of(&placeholder.path("empty"), true, &[]))
}

#[test]
fn an_unused_slot_is_bound_to_its_share_over_the_control_socket() {
    use crate::control::{listen, request, serve, ControlError, ControlRequest, ShareSlots};
    let placeholder = TempDir::new();
    let project = TempDir::new();
    std::fs::write(project.path("notes.txt"), b"hello").unwrap();
    let mut guest = placeholder_slot(&placeholder);
    let socket = placeholder.path("control.sock");
    let slots = ShareSlots {
        slots: vec![guest.dev.clone()],
        bound: false,
    };
    serve(listen(&socket).unwrap(), slots).unwrap();
    let bind = |share: FsShareConfig, write_limit| ControlRequest::BindShares {
        shares: vec![share],
        guest_owner: None,
        write_limit,
    };

    // Refused before anything changes: a share in another slot's tag, a missing directory.
    let wrong_tag = FsShareConfig {
        tag: "mxcfs1".into(),
        ..share_of(project.root(), false, &[])
    };
    let err = request(&socket, &bind(wrong_tag, None)).unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused(m) if m.contains("must have tag \"mxcfs0\"")),
        "{err}"
    );
    let err = request(
        &socket,
        &bind(share_of(&project.path("gone"), false, &[]), None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot open shared directory"), "{err}");

    // Bound: the guest's first mount sees the project, writable, with the write limit.
    request(
        &socket,
        &bind(share_of(project.root(), false, &[]), Some(3)),
    )
    .unwrap();
    assert!(!guest.dev.lock().unwrap().readonly());
    guest.init();
    let file = guest.lookup(1, "notes.txt").unwrap();
    let (created, fh) = guest
        .create(1, "new.txt", libc::O_WRONLY | libc::O_EXCL, 0o644)
        .unwrap();
    let over_limit = guest.write(created.nodeid, fh, 0, b"four");
    assert_eq!(file.attr.size, 5);
    assert_eq!(over_limit, Err(libc::ENOSPC));

    // Once: a second bind is refused, and so is a rebind of a slot the guest has used.
    let err = request(&socket, &bind(share_of(project.root(), true, &[]), None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bound already"), "{err}");
    let again = crate::devices::fs::share::prepare(&share_of(placeholder.root(), true, &[]));
    let err = guest
        .dev
        .lock()
        .unwrap()
        .rebind(again.unwrap(), None, None)
        .unwrap_err();
    assert!(matches!(err, FsError::AlreadyServing(_)), "{err}");

    // Garbage gets an answer naming it, not a dead socket.
    use std::io::{BufRead, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(b"{\"type\":\"format_disk\"}\n").unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&raw).read_line(&mut reply).unwrap();
    assert!(reply.contains("bad request"), "{reply}");
}

#[test]
fn a_slot_can_be_bound_only_to_a_share_of_its_own_tag() {
    let placeholder = TempDir::new();
    let project = TempDir::new();
    let guest = placeholder_slot(&placeholder);
    let other = FsShareConfig {
        tag: "mxcfs3".into(),
        ..share_of(project.root(), false, &[])
    };
    let prepared = crate::devices::fs::share::prepare(&other).unwrap();
    let err = guest
        .dev
        .lock()
        .unwrap()
        .rebind(prepared, None, None)
        .unwrap_err();
    assert!(matches!(err, FsError::RebindTag { .. }), "{err}");
}

#[test]
fn a_share_root_replaced_after_it_was_prepared_is_refused_by_the_starting_worker() {
    use crate::devices::fs::filter::PolicyFs;
    use crate::devices::fs::{share, ServerOptions};
    let parent = TempDir::new();
    let root = parent.root().join("share");
    std::fs::create_dir(&root).unwrap();
    let config = share_of(&root, false, &[]);
    let prepared = share::prepare_with(&config, &share::read_mountinfo().unwrap()).unwrap();
    let again = share::prepare(&config).unwrap();
    // Another directory now stands where the prepared one was.
    std::fs::rename(&root, parent.root().join("moved")).unwrap();
    std::fs::create_dir(&root).unwrap();

    // Started side by side (the worker opens the root): the failure comes with `started`.
    let starting = Fs::start_prepared(prepared, ServerOptions::default(), None).unwrap();
    let err = starting.started().unwrap_err();
    // Opened on a short-lived thread (a share bound later).
    let direct = PolicyFs::new(again, FsLimits::default(), None).unwrap_err();

    assert!(
        matches!(err, FsError::RootChanged(ref p) if *p == root),
        "{err}"
    );
    assert!(
        matches!(direct, FsError::RootChanged(ref p) if *p == root),
        "{direct}"
    );
}

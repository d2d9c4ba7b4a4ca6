//! Round trips of many small files and one large file through the device, with checksums.

use super::*;

#[test]
fn two_thousand_small_files_round_trip() {
    let dir = TempDir::new();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let tree = guest.mkdir(1, "many", 0o755).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..2000u64)
        .map(|i| {
            (
                format!("file-{i:04}"),
                pattern(100 + (i as usize * 37) % 3900, i),
            )
        })
        .collect();

    for (name, data) in &files {
        let (entry, fh) = guest
            .create(tree.nodeid, name, libc::O_WRONLY | libc::O_EXCL, 0o644)
            .unwrap();
        assert_eq!(
            guest.write(entry.nodeid, fh, 0, data).unwrap() as usize,
            data.len()
        );
        guest.release(entry.nodeid, fh).unwrap();
        guest.forget(entry.nodeid, 1);
    }
    let host_ok = files.iter().all(|(name, data)| {
        checksum(&std::fs::read(dir.path(&format!("many/{name}"))).unwrap()) == checksum(data)
    });
    let listed = guest.list(tree.nodeid, true).unwrap();
    for l in &listed {
        guest.forget(l.entry.unwrap().nodeid, 1);
    }
    let read_ok = files.iter().all(|(name, data)| {
        let entry = guest.lookup(tree.nodeid, name).unwrap();
        let back = guest.read_file(entry.nodeid, 4096).unwrap();
        guest.forget(entry.nodeid, 1);
        checksum(&back) == checksum(data)
    });

    assert!(host_ok);
    assert_eq!(listed.len(), 2000);
    assert!(read_ok);
    assert_eq!(guest.usage(), (1, 0));
}

#[test]
fn a_64_mib_file_round_trips_in_1_mib_requests() {
    const SIZE: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    let dir = TempDir::new();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    let data = pattern(SIZE, 64);

    let (entry, fh) = guest
        .create(1, "big.bin", libc::O_WRONLY | libc::O_EXCL, 0o644)
        .unwrap();
    let written: usize = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            guest
                .write(entry.nodeid, fh, (i * CHUNK) as u64, c)
                .unwrap() as usize
        })
        .sum();
    guest.fsync(entry.nodeid, fh).unwrap();
    guest.release(entry.nodeid, fh).unwrap();
    let on_host = std::fs::read(dir.path("big.bin")).unwrap();
    let back = guest.read_file(entry.nodeid, CHUNK as u32).unwrap();

    assert_eq!(written, SIZE);
    assert_eq!(on_host.len(), SIZE);
    assert_eq!(checksum(&on_host), checksum(&data));
    assert_eq!(back.len(), SIZE);
    assert_eq!(checksum(&back), checksum(&data));
}

#[test]
fn two_devices_on_one_rw_directory_do_not_corrupt_each_others_files() {
    let dir = TempDir::new();
    let cfg = share_of(dir.root(), false, &[]);
    let workers: Vec<std::thread::JoinHandle<()>> = (0..2u64)
        .map(|side| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut guest = Guest::new(&cfg);
                guest.init();
                for i in 0..200u64 {
                    let name = format!("side{side}-{i}");
                    let data = pattern(1000 + i as usize * 13, side * 1000 + i);
                    let (entry, fh) = guest.create(1, &name, libc::O_WRONLY, 0o644).unwrap();
                    guest.write(entry.nodeid, fh, 0, &data).unwrap();
                    guest.release(entry.nodeid, fh).unwrap();
                    // Both sides also read what the other wrote so far.
                    let other = format!("side{}-{}", 1 - side, i / 2);
                    if let Ok(e) = guest.lookup(1, &other) {
                        guest.read_file(e.nodeid, 4096).unwrap();
                    }
                }
            })
        })
        .collect();

    for w in workers {
        w.join().unwrap();
    }

    let intact = (0..2u64).all(|side| {
        (0..200u64).all(|i| {
            let data = pattern(1000 + i as usize * 13, side * 1000 + i);
            let on_host = std::fs::read(dir.path(&format!("side{side}-{i}"))).unwrap();
            checksum(&on_host) == checksum(&data)
        })
    });
    assert!(intact);
}

/// Set in the child process of `a_killed_vmm_keeps_what_the_guest_wrote`: the directory to
/// share.
const KILL_CHILD_DIR: &str = "MXC_FS_KILL_CHILD_DIR";

/// The child half: a device that writes through the guest, then waits to be killed.
#[test]
#[ignore = "child process of a_killed_vmm_keeps_what_the_guest_wrote"]
fn kill_child() {
    let dir = PathBuf::from(std::env::var(KILL_CHILD_DIR).unwrap());
    let mut guest = Guest::new(&share_of(&dir, false, &[]));
    guest.init();
    let (synced, sfh) = guest.create(1, "synced", libc::O_WRONLY, 0o644).unwrap();
    guest
        .write(synced.nodeid, sfh, 0, &pattern(1 << 20, 9))
        .unwrap();
    guest.fsync(synced.nodeid, sfh).unwrap();
    let (written, wfh) = guest.create(1, "written", libc::O_WRONLY, 0o644).unwrap();
    guest
        .write(written.nodeid, wfh, 0, &pattern(1 << 20, 10))
        .unwrap();
    std::fs::write(dir.join("ready"), b"").unwrap();
    // Killed here, with both files still open.
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_vmm_keeps_what_the_guest_wrote() {
    let dir = TempDir::new();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "devices::fs::tests::bulk::kill_child",
            "--ignored",
            "--test-threads=1",
        ])
        .env(KILL_CHILD_DIR, dir.root())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !dir.path("ready").exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let was_ready = dir.path("ready").exists();

    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();

    assert!(was_ready, "the child never got ready");
    assert!(!status.success());
    let synced = std::fs::read(dir.path("synced")).unwrap();
    let written = std::fs::read(dir.path("written")).unwrap();
    assert_eq!(checksum(&synced), checksum(&pattern(1 << 20, 9)));
    // Without writeback caching even unsynced writes reached the host before the reply.
    assert_eq!(checksum(&written), checksum(&pattern(1 << 20, 10)));
}

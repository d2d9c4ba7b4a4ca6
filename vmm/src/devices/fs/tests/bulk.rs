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

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::os::unix::fs::{FileExt, PermissionsExt};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testing::TempDir;
use crate::hypervisor::SavedState;

fn identity(dir: &Path) -> Identity {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"kernel").unwrap();
    Identity {
        format: FORMAT,
        vmm_version: "1.2.3".into(),
        flavour: Flavour::Pvm,
        host_cpu: host_cpu(),
        kernel: FileStamp::of(&kernel).unwrap(),
        initrd: None,
        cmdline_extra: "console=ttyS0".into(),
        mem_mib: 64,
        vcpus: 1,
    }
}

fn state() -> VmSnapshot {
    let mut vm = SavedState::new("kvm");
    vm.push("clock", vec![1, 2, 3, 0xff]);
    VmSnapshot {
        vm,
        vcpus: vec![SavedState::new("kvm")],
        serial: Some(SerialSnapshot {
            line_control: 3,
            ..Default::default()
        }),
        virtio: Vec::new(),
    }
}

#[test]
fn a_saved_snapshot_loads_back_with_its_memory_and_holes() {
    let tmp = TempDir::new();
    let id = identity(tmp.root());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    mem.write_slice(b"hello", GuestAddress(0x20_0000)).unwrap();
    mem.write_slice(b"end", GuestAddress((64 << 20) - 3))
        .unwrap();
    let dir = tmp.path("snap");

    let header = save(&dir, id.clone(), &state(), &mem).unwrap();
    let loaded = load(&dir, &id).unwrap();

    assert_eq!(loaded.header, header);
    assert_eq!(loaded.state, state());
    let restored = map_memory(&loaded.memory, &dir.join(MEMORY_FILE), 64).unwrap();
    let mut buf = [0u8; 5];
    restored
        .read_slice(&mut buf, GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(&buf, b"hello");
    // Copy-on-write: the guest's writes never reach the file.
    restored
        .write_slice(b"HELLO", GuestAddress(0x20_0000))
        .unwrap();
    let again = map_memory(&loaded.memory, &dir.join(MEMORY_FILE), 64).unwrap();
    again.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&buf, b"hello");
    // Zero pages are holes: far less than 64 MiB is allocated on disk.
    let meta = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    for file in [STATE_FILE, MEMORY_FILE] {
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_snapshot_of_anything_else_is_refused_naming_the_difference() {
    let tmp = TempDir::new();
    let id = identity(tmp.root());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    let dir = tmp.path("snap");
    save(&dir, id.clone(), &state(), &mem).unwrap();

    let mut other = id.clone();
    other.vcpus = 2;
    let err = load(&dir, &other).unwrap_err().to_string();
    assert!(err.contains("vCPUs 1, but this VM has 2"), "{err}");

    let mut other = id.clone();
    other.flavour = Flavour::HardwareSvm;
    let err = load(&dir, &other).unwrap_err().to_string();
    assert!(err.contains("hypervisor"), "{err}");

    // A rebuilt kernel (same path, new contents) is another kernel.
    std::fs::write(&id.kernel.path, b"kernel, rebuilt").unwrap();
    let mut other = id.clone();
    other.kernel = FileStamp::of(&id.kernel.path).unwrap();
    let err = load(&dir, &other).unwrap_err().to_string();
    assert!(err.contains("kernel"), "{err}");
}

#[test]
fn a_damaged_snapshot_is_refused() {
    let tmp = TempDir::new();
    let id = identity(tmp.root());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    let dir = tmp.path("snap");
    save(&dir, id.clone(), &state(), &mem).unwrap();
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).unwrap();

    // One flipped byte in the state.
    let mut flipped = text.clone();
    let last = flipped.len() - 2;
    flipped[last] ^= 1;
    std::fs::write(&state_path, &flipped).unwrap();
    let err = load(&dir, &id).unwrap_err().to_string();
    assert!(err.contains("does not match its checksum"), "{err}");

    // A header from another format.
    let other =
        String::from_utf8(text.clone())
            .unwrap()
            .replacen("\"format\":1", "\"format\":99", 1);
    std::fs::write(&state_path, other).unwrap();
    let err = load(&dir, &id).unwrap_err().to_string();
    assert!(err.contains("snapshot format 99"), "{err}");

    // Memory cut short.
    std::fs::write(&state_path, &text).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    memory.set_len(4096).unwrap();
    let err = load(&dir, &id).unwrap_err().to_string();
    assert!(err.contains("guest memory does not match"), "{err}");

    // A memory file the wrong size for the guest is never mapped.
    let file = std::fs::File::open(dir.join(MEMORY_FILE)).unwrap();
    let err = map_memory(&file, &dir.join(MEMORY_FILE), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("4096 bytes of memory for a 64 MiB guest"),
        "{err}"
    );
}

#[test]
fn a_failed_save_leaves_the_previous_snapshot_alone_and_no_temporary_files() {
    let tmp = TempDir::new();
    let id = identity(tmp.root());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    let dir = tmp.path("snap");
    save(&dir, id.clone(), &state(), &mem).unwrap();
    // A leftover temporary name of this process makes the next save fail early.
    let blocker = dir.join(format!(".{MEMORY_FILE}.{}.tmp", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();

    assert!(save(&dir, id.clone(), &state(), &mem).is_err());

    std::fs::remove_dir(&blocker).unwrap();
    assert!(load(&dir, &id).is_ok());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn saved_hypervisor_state_is_hex_in_the_file_and_checked_on_the_way_back() {
    let mut state = SavedState::new("kvm");
    state.push("regs", vec![0x00, 0x0f, 0xa0, 0xff]);
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"000fa0ff\""), "{json}");
    assert_eq!(serde_json::from_str::<SavedState>(&json).unwrap(), state);
    for bad in ["\"0\"", "\"zz\"", "\"0G\""] {
        let text = json.replace("\"000fa0ff\"", bad);
        assert!(serde_json::from_str::<SavedState>(&text).is_err(), "{bad}");
    }
    assert!(state.part("lapic").is_err());
    assert!(state.check_backend("whp").is_err());
}

#[test]
fn memory_is_read_for_its_checksum_once_per_version_of_the_file() {
    let tmp = TempDir::new();
    let id = identity(tmp.root());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    mem.write_slice(b"hello", GuestAddress(0x20_0000)).unwrap();
    let dir = tmp.path("snap");
    save(&dir, id.clone(), &state(), &mem).unwrap();
    let record = dir.join(VERIFIED_FILE);
    let ns = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128
    };
    let now = ns(std::time::SystemTime::now());

    // A file changed a moment ago is checked but not recorded (its times could still
    // miss a write in the same clock tick).
    load_at(&dir, &id, now).unwrap();
    assert!(!record.exists());
    // Once it has settled, the check is recorded, privately.
    let later = now + 3_000_000_000;
    load_at(&dir, &id, later).unwrap();
    let mode = std::fs::metadata(&record).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The record stands for this very file: a changed byte changes the file's times and
    // the whole file is read again.
    let memory_path = dir.join(MEMORY_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory_path)
        .unwrap();
    file.write_all_at(b"j", 0x20_0000).unwrap();
    drop(file);
    let err = load_at(&dir, &id, later + 3_000_000_000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("guest memory does not match"), "{err}");

    // And the record is what lets a restore skip the read: one forged for the damaged
    // file's current identity is believed (only the owner can write it).
    let meta = std::fs::metadata(&memory_path).unwrap();
    let header = check(&dir, &id).unwrap();
    let forged = serde_json::to_vec(&memory::Verified::of(&meta, header.memory_crc32)).unwrap();
    std::fs::write(&record, forged).unwrap();
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o600)).unwrap();
    load_at(&dir, &id, later + 3_000_000_000).unwrap();
    // A record others could write is ignored.
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o622)).unwrap();
    let err = load_at(&dir, &id, later + 3_000_000_000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("guest memory does not match"), "{err}");
}

#[test]
fn the_parent_leaves_the_record_a_restore_that_cannot_write_needs() {
    let tmp = TempDir::new();
    let id = identity(tmp.root());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    let dir = tmp.path("snap");
    save(&dir, id.clone(), &state(), &mem).unwrap();
    let record = dir.join(VERIFIED_FILE);
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
        + 3_000_000_000;

    verify_memory_at(&dir, later).unwrap();
    assert!(record.exists());

    // Damaged memory: refused, in full, whatever the record.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    file.write_all_at(b"j", 0x1000).unwrap();
    drop(file);
    let err = verify_memory_at(&dir, later + 3_000_000_000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("guest memory does not match"), "{err}");
}

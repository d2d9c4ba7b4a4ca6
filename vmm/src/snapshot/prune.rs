//! Snapshots an older build left behind. Each holds the guest's whole memory (256 MiB for
//! the default VM), and a new VMM, kernel or initramfs makes a new one beside it under a
//! new key: without pruning, every upgrade would leave one more.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Header, Identity, MAX_STATE_FILE, STATE_FILE};

/// How old a directory without a state file must be to count as a failed save (a save
/// in progress writes the state file last).
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// The header of the snapshot in `dir`, if it has a readable one (nothing else checked).
fn header(dir: &Path) -> Option<Header> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(dir.join(STATE_FILE)).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(file.take(MAX_STATE_FILE))
        .read_until(b'\n', &mut line)
        .ok()?;
    serde_json::from_slice(&line).ok()
}

/// Whether `old` is what an older build made of the VM `new` is: the same machine and
/// VM shape, made by another format, VMM, kernel or initramfs (this VMM never restores
/// it again).
fn superseded(old: &Identity, new: &Identity) -> bool {
    let same_vm = old.flavour == new.flavour
        && old.host_cpu == new.host_cpu
        && old.cmdline_extra == new.cmdline_extra
        && old.mem_mib == new.mem_mib
        && old.vcpus == new.vcpus;
    let other_build = old.format != new.format
        || old.vmm_version != new.vmm_version
        || old.kernel != new.kernel
        || old.initrd != new.initrd;
    same_vm && other_build
}

/// A snapshot directory's name: a key of 24 hex digits.
fn is_key(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Remove, beside the snapshot just saved in `kept`, the snapshots an older build made
/// of the same VM, and directories a failed save left over an hour ago. Only our own
/// directories with a key's name are touched. Returns what was removed.
pub fn prune_superseded(kept: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let (Some(parent), Some(new)) = (kept.parent(), header(kept)) else {
        return removed;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return removed;
    };
    // SAFETY: geteuid() has no preconditions.
    let me = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if path == kept || !meta.is_dir() || meta.uid() != me {
            continue;
        }
        if !name.to_str().is_some_and(is_key) {
            continue;
        }
        let stale = match header(&path) {
            Some(old) => superseded(&old.identity, &new.identity),
            None => {
                !path.join(STATE_FILE).exists()
                    && meta.modified().ok().is_some_and(|m| {
                        SystemTime::now()
                            .duration_since(m)
                            .is_ok_and(|age| age > ABANDONED_AFTER)
                    })
            }
        };
        if stale && std::fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(vmm: &str, mem_mib: u32) -> Identity {
        Identity {
            format: super::super::FORMAT,
            vmm_version: vmm.into(),
            flavour: crate::hypervisor::Flavour::Pvm,
            host_cpu: "cpu".into(),
            kernel: super::super::FileStamp {
                path: "/k".into(),
                len: 1,
                mtime_ns: 1,
            },
            initrd: None,
            cmdline_extra: String::new(),
            mem_mib,
            vcpus: 1,
        }
    }

    fn write_snapshot(dir: &Path, id: &Identity) -> PathBuf {
        let path = dir.join(id.key());
        std::fs::create_dir_all(&path).unwrap();
        let header = Header {
            identity: id.clone(),
            state_len: 0,
            state_crc32: 0,
            memory_len: 0,
            memory_crc32: 0,
        };
        let mut text = serde_json::to_vec(&header).unwrap();
        text.push(b'\n');
        std::fs::write(path.join(STATE_FILE), text).unwrap();
        std::fs::write(path.join(super::super::MEMORY_FILE), b"").unwrap();
        path
    }

    #[test]
    fn an_older_build_of_the_same_vm_goes_other_shapes_stay() {
        let root = std::env::temp_dir().join(format!("mxc-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let new = write_snapshot(&root, &identity("2", 256));
        let old = write_snapshot(&root, &identity("1", 256));
        let other_shape = write_snapshot(&root, &identity("1", 512));
        let not_ours = root.join("notes");
        std::fs::create_dir_all(&not_ours).unwrap();
        // A save in progress (no state file yet, just made) stays.
        let in_progress = root.join("0123456789abcdef01234567");
        std::fs::create_dir_all(&in_progress).unwrap();
        assert_eq!(prune_superseded(&new), vec![old.clone()]);
        assert!(new.exists() && other_shape.exists() && not_ours.exists());
        assert!(in_progress.exists() && !old.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}

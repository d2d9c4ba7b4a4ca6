//! VM snapshots: a booted guest saved to a directory, and started again from it.
//!
//! A snapshot directory holds two files, both private to their owner (0600, in a 0700
//! directory):
//! - `memory`: guest RAM, region after region (zero pages left as holes). A restored VM
//!   maps it `MAP_PRIVATE`: pages load when the guest first touches them, many VMs share
//!   the unchanged ones, and nothing a VM writes reaches the file.
//! - `vm.json`: one line of [`Header`] (what the snapshot was made from, and the length
//!   and CRC-32 of the state and of `memory`), then the [`VmSnapshot`]: hypervisor state
//!   of the VM and each vCPU, the serial port, every virtio-mmio transport.
//!
//! A restore checks both checksums before the guest runs (the memory's once per version
//! of the file, see [`VERIFIED_FILE`]) and refuses a snapshot made
//! by another format, VMM version, hypervisor flavour, host CPU, kernel, initrd, guest
//! command line, memory size or vCPU count, naming what differs. Saving writes both
//! files under temporary names and renames `vm.json` last, so a directory never holds
//! half a snapshot under the real names.

mod memory;
mod prune;

pub use prune::prune_superseded;

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::memory::{map_memory, VERIFIED_FILE};
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::MmioError;
use crate::devices::virtio::TransportSnapshot;
use crate::hypervisor::{Flavour, HypervisorError, SavedState};
use crate::memory::GuestMemoryMmap;

/// Version of the snapshot format; bumped on any change to what is saved.
pub const FORMAT: u32 = 1;
/// The file with the header and the device and vCPU state.
pub const STATE_FILE: &str = "vm.json";
/// The file with guest RAM.
pub const MEMORY_FILE: &str = "memory";
/// `vm.json` is never larger than this (it holds registers, not memory).
const MAX_STATE_FILE: u64 = 16 << 20;

/// Errors saving or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a usable snapshot: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "the snapshot in {} was made with {field} {saved}, but this VM has {now}; make a new one",
        dir.display()
    )]
    Mismatch {
        dir: PathBuf,
        field: &'static str,
        saved: String,
        now: String,
    },
    #[error("{} is readable by other users (mode {mode:o}); a snapshot holds guest memory and must be private", path.display())]
    NotPrivate { path: PathBuf, mode: u32 },
    #[error("{} belongs to uid {owner}, not to this user", path.display())]
    NotOwned { path: PathBuf, owner: u32 },
    #[error("the VM cannot be saved: {0}")]
    Unsaveable(String),
    #[error("hypervisor state")]
    Hypervisor(#[from] HypervisorError),
    #[error("virtio device state")]
    Mmio(#[from] MmioError),
}

impl SnapshotError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }
}

/// A file a snapshot depends on, as it was when the snapshot was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub len: u64,
    /// Its modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> Result<Self, SnapshotError> {
        let meta = std::fs::metadata(path).map_err(SnapshotError::io("read", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            len: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        })
    }
}

impl std::fmt::Display for FileStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes, modified at {} ns)",
            self.path.display(),
            self.len,
            self.mtime_ns
        )
    }
}

/// What a snapshot was made from: a restore needs every field to match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// [`FORMAT`].
    pub format: u32,
    /// The VMM's version.
    pub vmm_version: String,
    /// The hypervisor flavour.
    pub flavour: Flavour,
    /// The host CPU (vendor, family, model, stepping).
    pub host_cpu: String,
    /// The guest kernel.
    pub kernel: FileStamp,
    /// The initramfs.
    pub initrd: Option<FileStamp>,
    /// What the VMM added to the guest's command line.
    pub cmdline_extra: String,
    /// Guest RAM.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
}

impl Identity {
    /// The first field in which `now` differs from this (saved) identity: (field,
    /// saved, now).
    pub fn difference(&self, now: &Identity) -> Option<(&'static str, String, String)> {
        let show_initrd = |i: &Option<FileStamp>| {
            i.as_ref()
                .map_or_else(|| "no initrd".to_string(), ToString::to_string)
        };
        let fields = [
            (
                "snapshot format",
                self.format.to_string(),
                now.format.to_string(),
            ),
            (
                "VMM version",
                self.vmm_version.clone(),
                now.vmm_version.clone(),
            ),
            (
                "hypervisor",
                self.flavour.to_string(),
                now.flavour.to_string(),
            ),
            ("host CPU", self.host_cpu.clone(), now.host_cpu.clone()),
            ("kernel", self.kernel.to_string(), now.kernel.to_string()),
            (
                "initrd",
                show_initrd(&self.initrd),
                show_initrd(&now.initrd),
            ),
            (
                "guest command line",
                format!("{:?}", self.cmdline_extra),
                format!("{:?}", now.cmdline_extra),
            ),
            (
                "guest memory (MiB)",
                self.mem_mib.to_string(),
                now.mem_mib.to_string(),
            ),
            ("vCPUs", self.vcpus.to_string(), now.vcpus.to_string()),
        ];
        fields.into_iter().find(|(_, saved, now)| saved != now)
    }
}

impl Identity {
    /// A short name for this identity (hex), for a directory of snapshots keyed by
    /// what they were made from. Equal identities get equal keys.
    pub fn key(&self) -> String {
        let text = serde_json::to_vec(self).unwrap_or_default();
        let (front, back) = text.split_at(text.len() / 2);
        format!(
            "{:08x}{:08x}{:08x}",
            crc32fast::hash(&text),
            crc32fast::hash(front),
            crc32fast::hash(back)
        )
    }
}

/// The host CPU as a snapshot records it: vendor and family/model/stepping signature.
pub fn host_cpu() -> String {
    use std::arch::x86_64::__cpuid;
    let leaf0 = __cpuid(0);
    let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    let signature = __cpuid(1).eax;
    format!(
        "{} signature {signature:#x}",
        String::from_utf8_lossy(&vendor)
    )
}

/// The first line of `vm.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// What the snapshot was made from.
    pub identity: Identity,
    /// Length and CRC-32 of the state after the header line.
    pub state_len: u64,
    pub state_crc32: u32,
    /// Length and CRC-32 of the `memory` file.
    pub memory_len: u64,
    pub memory_crc32: u32,
}

/// Everything but memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// VM-wide hypervisor state (interrupt controllers, clock).
    pub vm: SavedState,
    /// Each vCPU's state, by id.
    pub vcpus: Vec<SavedState>,
    /// The serial port, if the VM had one.
    pub serial: Option<SerialSnapshot>,
    /// The virtio-mmio transports, by slot.
    pub virtio: Vec<TransportSnapshot>,
}

/// A snapshot read back and checked, ready to restore.
#[derive(Debug)]
pub struct Loaded {
    /// Its header.
    pub header: Header,
    /// Its state.
    pub state: VmSnapshot,
    /// The open memory file (checked against the header).
    pub memory: std::fs::File,
}

/// Save `state` and `mem` into `dir` (created 0700 if missing).
pub fn save(
    dir: &Path,
    identity: Identity,
    state: &VmSnapshot,
    mem: &GuestMemoryMmap,
) -> Result<Header, SnapshotError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(SnapshotError::io("create", dir))?;
    let pid = std::process::id();
    let memory_tmp = dir.join(format!(".{MEMORY_FILE}.{pid}.tmp"));
    let state_tmp = dir.join(format!(".{STATE_FILE}.{pid}.tmp"));
    let result = (|| {
        let (memory_len, memory_crc32) = memory::write(&memory_tmp, mem)?;
        let body = serde_json::to_vec(state)
            .map_err(|e| SnapshotError::Unsaveable(format!("cannot encode the state: {e}")))?;
        let header = Header {
            identity,
            state_len: body.len() as u64,
            state_crc32: crc32fast::hash(&body),
            memory_len,
            memory_crc32,
        };
        let mut text = serde_json::to_vec(&header)
            .map_err(|e| SnapshotError::Unsaveable(format!("cannot encode the header: {e}")))?;
        text.push(b'\n');
        text.extend_from_slice(&body);
        write_private(&state_tmp, &text)?;
        // The old state goes first: at no moment does vm.json describe another memory.
        let state_path = dir.join(STATE_FILE);
        match std::fs::remove_file(&state_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::io("replace", &state_path)(e))
            }
            _ => {}
        }
        let memory_path = dir.join(MEMORY_FILE);
        std::fs::rename(&memory_tmp, &memory_path)
            .map_err(SnapshotError::io("rename into place", &memory_path))?;
        std::fs::rename(&state_tmp, &state_path)
            .map_err(SnapshotError::io("rename into place", &state_path))?;
        Ok(header)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&memory_tmp);
        let _ = std::fs::remove_file(&state_tmp);
    }
    result
}

/// Create `path` (0600, must not exist) holding `bytes`, flushed to disk.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(SnapshotError::io("create", path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(SnapshotError::io("write", path))
}

/// Refuse a snapshot file other users could read or that is not ours.
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), SnapshotError> {
    // SAFETY: geteuid() has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(SnapshotError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
        });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SnapshotError::NotPrivate {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Open a snapshot file that must be private and ours, with its metadata.
fn open_private(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), SnapshotError> {
    let file = std::fs::File::open(path).map_err(SnapshotError::io("open", path))?;
    let meta = file.metadata().map_err(SnapshotError::io("read", path))?;
    check_private(path, &meta)?;
    Ok((file, meta))
}

/// The header of the snapshot in `dir` (its state file private and ours).
fn read_header(dir: &Path) -> Result<Header, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let (file, _) = open_private(&state_path)?;
    let mut line = Vec::new();
    std::io::BufRead::read_until(
        &mut std::io::BufReader::new(file.take(MAX_STATE_FILE)),
        b'\n',
        &mut line,
    )
    .map_err(SnapshotError::io("read", &state_path))?;
    serde_json::from_slice(&line).map_err(|e| SnapshotError::Corrupt {
        path: state_path,
        why: format!("header: {e}"),
    })
}

/// Check the guest memory of the snapshot in `dir` against its header's checksum, as a
/// restore does, and leave the record of the check (read in full only where there is no
/// record of this very file yet). For a restore that may not write `dir` (a jailed VMM:
/// the snapshot every later VM restores from is read-only to it), its parent calls this
/// first, so the VMM finds the record instead of reading the whole file again.
pub fn verify_memory(dir: &Path) -> Result<(), SnapshotError> {
    verify_memory_at(dir, wall_clock_ns())
}

/// [`verify_memory`] at wall-clock time `now_ns`.
fn verify_memory_at(dir: &Path, now_ns: i128) -> Result<(), SnapshotError> {
    let header = read_header(dir)?;
    let memory_path = dir.join(MEMORY_FILE);
    let (memory, meta) = open_private(&memory_path)?;
    memory::verify(
        dir,
        &memory,
        &memory_path,
        &meta,
        header.memory_crc32,
        now_ns,
    )
    .map(|_| ())
}

fn wall_clock_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Whether the snapshot in `dir` can be restored into a VM of identity `now`, from its
/// header and the files' metadata alone (no checksum: the restore verifies those).
pub fn check(dir: &Path, now: &Identity) -> Result<Header, SnapshotError> {
    let header = read_header(dir)?;
    if let Some((field, saved, now)) = header.identity.difference(now) {
        return Err(SnapshotError::Mismatch {
            dir: dir.to_path_buf(),
            field,
            saved,
            now,
        });
    }
    let memory_path = dir.join(MEMORY_FILE);
    let meta = std::fs::metadata(&memory_path).map_err(SnapshotError::io("open", &memory_path))?;
    check_private(&memory_path, &meta)?;
    if meta.len() != header.memory_len {
        return Err(SnapshotError::Corrupt {
            path: memory_path,
            why: "guest memory is not the size the header says".into(),
        });
    }
    Ok(header)
}

/// Read the snapshot in `dir`, check it is whole, private and ours, and that it was made
/// from `now`.
pub fn load(dir: &Path, now: &Identity) -> Result<Loaded, SnapshotError> {
    load_at(dir, now, wall_clock_ns())
}

/// [`load`] at wall-clock time `now_ns`.
fn load_at(dir: &Path, now: &Identity, now_ns: i128) -> Result<Loaded, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: state_path.clone(),
        why,
    };
    let (file, meta) = open_private(&state_path)?;
    if meta.len() > MAX_STATE_FILE {
        return Err(corrupt(format!("{} bytes is too large", meta.len())));
    }
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_STATE_FILE)
        .read_to_end(&mut text)
        .map_err(SnapshotError::io("read", &state_path))?;
    let newline = text
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let (head, body) = text.split_at(newline);
    let body = body.get(1..).unwrap_or_default();
    let header: Header =
        serde_json::from_slice(head).map_err(|e| corrupt(format!("header: {e}")))?;
    if header.identity.format != FORMAT {
        return Err(SnapshotError::Mismatch {
            dir: dir.to_path_buf(),
            field: "snapshot format",
            saved: header.identity.format.to_string(),
            now: FORMAT.to_string(),
        });
    }
    if body.len() as u64 != header.state_len || crc32fast::hash(body) != header.state_crc32 {
        return Err(corrupt("the state does not match its checksum".into()));
    }
    if let Some((field, saved, now)) = header.identity.difference(now) {
        return Err(SnapshotError::Mismatch {
            dir: dir.to_path_buf(),
            field,
            saved,
            now,
        });
    }
    let state: VmSnapshot =
        serde_json::from_slice(body).map_err(|e| corrupt(format!("state: {e}")))?;
    let memory_path = dir.join(MEMORY_FILE);
    let (memory, meta) = open_private(&memory_path)?;
    if meta.len() != header.memory_len {
        return Err(SnapshotError::Corrupt {
            path: memory_path,
            why: "guest memory does not match its checksum".into(),
        });
    }
    memory::verify(
        dir,
        &memory,
        &memory_path,
        &meta,
        header.memory_crc32,
        now_ns,
    )?;
    Ok(Loaded {
        header,
        state,
        memory,
    })
}

#[cfg(test)]
mod tests;

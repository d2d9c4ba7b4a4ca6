//! virtio-fs: host directories shared with the guest, with the policy enforced on the host.
//!
//! The guest mounts a share with `mount -t virtiofs <tag> <path>`; its kernel sends FUSE
//! requests over the device's virtqueues, and the VMM answers them itself (no virtiofsd)
//! with `fuse-backend-rs`'s FUSE server and its passthrough file system, behind a policy
//! layer ([`filter`]) that decides what the guest may see and change.
//!
//! # Design
//! **One device per share.** Every policy mount becomes its own device with its own tag
//! (`mxcfs0`, `mxcfs1`, …), its own passthrough root and its own worker thread. The
//! alternative, one device whose root is a synthetic tree stitched from the policy's paths,
//! needs a virtual directory layer (fake inodes for the path prefixes, merging of listings,
//! per-subtree read-only flags) in front of the passthrough, and that layer would be the
//! most security-sensitive code in the VMM. With one device per share, confinement is the
//! kernel's: every lookup is an `openat(dirfd, name, O_PATH | O_NOFOLLOW)` relative to a
//! directory the share already reached, starting from a root opened once; a read-only
//! share is read-only as a whole, and the guest can mount it `ro` too. The cost is one
//! MMIO slot, one interrupt line and one thread per share, which is small for the handful
//! of mounts a policy names (the project, the host's `/usr`, `/bin`, `/lib*`).
//!
//! **Where the policy is enforced.** [`filter::PolicyFs`] implements fuse-backend-rs's
//! `FileSystem` trait around `PassthroughFs`. It lets through only the operations it knows
//! (every other one fails with `ENOSYS`), and:
//! - on a read-only share refuses every mutating operation with `EROFS` (writes, creates,
//!   renames, links, attribute changes, opens for writing or truncation) before the
//!   passthrough sees it;
//! - hides denied paths: a lookup of a denied name fails with `ENOENT` and listings omit it.
//!   Paths are matched by `(st_dev, st_ino)` collected when the device is created (so a hard
//!   link to a denied file, or a denied file renamed inside the share, is hidden too), and
//!   by `(parent directory, name)` (so a denied file that does not exist yet, or that the
//!   host replaces with a new inode, stays hidden);
//! - keeps the guest on the share's file system: an entry on another device (a mount point
//!   inside the share: `/proc`, a FUSE mount, a tmpfs) is absent, and so is every mount
//!   point inside the share listed in the VMM's mount table at creation (which covers bind
//!   mounts of the same file system, hidden by name like a denied path);
//! - refuses names that are empty, `.`, `..` or contain `/`, so `..` never leaves the root;
//!   symlinks are never followed on the host (lookups use `O_NOFOLLOW`, only regular files
//!   and directories are ever opened; the guest kernel resolves symlink targets itself,
//!   through the same filtered lookups);
//! - only accepts node ids it handed to the guest, and handle numbers the guest opened;
//! - bounds the number of inodes (each holds an `O_PATH` fd) and open handles; node ids
//!   are derived from host inode numbers, so the passthrough keeps nothing for an inode
//!   once the guest forgets it;
//! - strips set-user-ID and set-group-ID bits from every mode the guest sets, refuses device
//!   nodes, and runs creations with the worker thread's own credentials (guest uids are
//!   never adopted).
//!
//! **Credentials.** Each device's worker thread confines itself before serving (see
//! [`creds`]): a private umask and cwd (`unshare(CLONE_FS)`), optionally a different
//! uid/gid ([`RunAs`], for an `mxc-vm` running as root on behalf of a user), and an empty
//! capability set (effective, permitted, inheritable, ambient). The server then needs no
//! capability at all: as root it can no longer bypass file permissions
//! (`CAP_DAC_OVERRIDE`), chown, create device nodes or keep set-ID bits; as an ordinary
//! user nothing changes (it has no capabilities to drop) and the share is limited by that
//! user's own permissions.
//!
//! **Data safety.** No writeback cache: the device refuses `FUSE_WRITEBACK_CACHE`, so every
//! guest `write()` is a FUSE `WRITE` that the server turns into a `pwritev` on the host file
//! before it answers; `fsync`/`fdatasync`/`FLUSH` map to the same calls on the host fd.
//! Nothing is buffered in the VMM, so what the guest wrote is in the host's page cache when
//! the guest sees the write complete, and on disk once its `fsync` returns, whatever happens
//! to the VM afterwards.
//!
//! # The vm-memory version bridge
//! fuse-backend-rs 0.14 speaks vm-memory 0.17 and virtio-queue 0.17, the rest of the VMM
//! 0.18 (linux-loader 0.14 requires it; no fuse-backend-rs release uses 0.18). The two are
//! different crates to the compiler, but guest RAM is just host mappings. [`bridge`] gives
//! the worker a vm-memory 0.17 `GuestMemoryMmap` whose regions are non-owning views
//! (`MmapRegion::build_raw`) of the very same host mappings as the VMM's 0.18 regions, and
//! keeps a clone of the 0.18 memory next to it, so the mappings stay alive for as long as
//! the view does, however the VMM orders its drops. At activation it rebuilds each queue as
//! a virtio-queue 0.17 `Queue` from the 0.18 queue's ring addresses, size and indices; from
//! then on only the worker touches the rings. Nothing is copied per request, and the
//! bridge's only unsafe code is the view construction.
//!
//! # Layout
//! - [`device`]: the virtio device (type 26, config space, activation, the worker's life).
//! - `queue_handler`: the worker thread: its event loop, the queues, one request at a time.
//! - [`protocol`]: checks on each request before the FUSE server sees it.
//! - [`filter`]: the policy layer around the passthrough file system.
//! - [`share`]: turning an [`FsShareConfig`] into a checked root and a denied set.
//! - [`creds`]: the worker thread's credentials.
//! - [`bridge`]: the vm-memory / virtio-queue 0.17 view.
//! - `event_handler`: the `event-manager` glue (the worker reports its end there).
//!
//! See `INTEGRATION.md` next to this file for what the VMM and the guest agent must do,
//! the known limits of the hiding rules, and the measured cost per request.

pub mod bridge;
pub mod budget;
pub mod creds;
pub mod device;
mod event_handler;
pub mod filter;
pub mod protocol;
pub(crate) mod queue_handler;
pub mod share;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use budget::WriteBudget;
pub use creds::RunAs;
pub use device::{Fs, FS_DEVICE_TYPE, NUM_QUEUES, QUEUE_SIZE, TAG_LEN};

/// One directory shared with the guest, as the VMM's JSON config names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsShareConfig {
    /// The virtio-fs tag the guest mounts (`mxcfs0`, …): 1 to 36 bytes, no NUL.
    pub tag: String,
    /// The host directory to share (resolved once, when the device is created).
    pub host_path: PathBuf,
    /// Where the guest agent mounts it (absolute); the device itself does not use it.
    pub guest_path: PathBuf,
    /// Refuse every change on the host (and mount `ro` in the guest).
    #[serde(default)]
    pub readonly: bool,
    /// Absolute host paths inside `host_path` the guest must not see.
    #[serde(default)]
    pub denied: Vec<PathBuf>,
    /// When set, the only names directly under the root that exist for the guest: every
    /// other entry of the root is absent (and cannot be created), including entries the
    /// host adds later. For sharing a few files of a directory, or the non-secret part of
    /// `/etc`. Each name is one path component (no `/`, not empty, `.` or `..`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_allowlist: Option<Vec<String>>,
    /// Host inodes `(st_dev, st_ino)` the guest must not see, as if they were denied
    /// paths: what the VMM's jail covered of the share (`crate::jail::ShareView`), so a
    /// hard link to one of them elsewhere in the share stays hidden.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_inodes: Vec<(u64, u64)>,
}

/// Bounds on what one share's server holds for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FsLimits {
    /// Inodes the guest may hold at once (each holds one `O_PATH` fd on the host). Lookups
    /// past it fail with `ENFILE` until the guest forgets some.
    pub max_inodes: usize,
    /// Files and directories the guest may have open at once. Opens past it fail with
    /// `EMFILE`.
    pub max_handles: usize,
}

impl Default for FsLimits {
    fn default() -> Self {
        Self {
            max_inodes: 32_768,
            max_handles: 1_024,
        }
    }
}

/// How a share's server runs, beyond what the share itself says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    pub limits: FsLimits,
    /// Serve as this user and group (needs `mxc-vm` to run as root); `None`: as the VMM's
    /// own user, without capabilities.
    pub run_as: Option<RunAs>,
    /// The uid (and gid) the guest's commands run as: files the server's user owns are
    /// shown to the guest as theirs ([`filter::OwnerMap`]); `None`: shown as they are.
    pub guest_owner: Option<u32>,
}

/// Errors setting up a share or its device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("share tag {0:?} must be 1 to 36 bytes without NUL")]
    InvalidTag(String),
    #[error("share tag {0:?} is used twice")]
    DuplicateTag(String),
    #[error("guest path {} of share {tag:?} must be absolute", .path.display())]
    GuestPathNotAbsolute { tag: String, path: PathBuf },
    #[error("guest path {} is used by two shares", .0.display())]
    DuplicateGuestPath(PathBuf),
    #[error("cannot open shared directory {}", .path.display())]
    HostPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shared path {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("shared path {} is not valid UTF-8", .0.display())]
    NonUtf8Path(PathBuf),
    #[error("root_allowlist entry {name:?} of share {tag:?} must be a single file name")]
    BadAllowedName { tag: String, name: String },
    #[error("denied path {} must be absolute", .0.display())]
    DeniedNotAbsolute(PathBuf),
    #[error("denied path {} is not inside share {}", .denied.display(), .share.display())]
    DeniedOutsideShare { denied: PathBuf, share: PathBuf },
    #[error("denied path {} is the share's root (drop the share instead)", .0.display())]
    DeniedIsShareRoot(PathBuf),
    #[error("denied path {}: its parent directory does not exist", .0.display())]
    DeniedParentMissing(PathBuf),
    #[error("cannot inspect denied path {}", .path.display())]
    DeniedPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "denied directory {} holds more than {limit} entries (deny a smaller tree)",
        .path.display()
    )]
    DeniedTreeTooLarge { path: PathBuf, limit: usize },
    #[error("limits must be at least 1 (max_inodes {max_inodes}, max_handles {max_handles})")]
    InvalidLimits {
        max_inodes: usize,
        max_handles: usize,
    },
    #[error("cannot start the passthrough file system for {}", .path.display())]
    Passthrough {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shared directory {} changed while the share was set up", .0.display())]
    RootChanged(PathBuf),
    #[error("run_as needs mxc-vm to run as root (it runs as uid {0})")]
    RunAsNeedsRoot(u32),
    #[error("share {tag:?} cannot be bound to slot {slot:?}: the tags differ")]
    RebindTag { slot: String, tag: String },
    #[error("slot {0:?} cannot be bound to another share: the guest already uses it")]
    AlreadyServing(String),
    #[error("cannot start the fs device's worker")]
    Worker(#[source] std::io::Error),
    #[error("cannot create the fs device's eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(
        "{shares} shares need at least {needed} file descriptors but RLIMIT_NOFILE allows \
         {limit} (raise the hard limit or share fewer directories)"
    )]
    FdBudget {
        shares: usize,
        needed: u64,
        limit: u64,
    },
}

/// Check a set of shares together: every share on its own (tag, guest path) and no tag or
/// guest path used twice. Host paths are checked when each device is created.
pub fn validate_shares(shares: &[FsShareConfig]) -> Result<(), FsError> {
    let mut tags = HashSet::new();
    let mut guest_paths = HashSet::new();
    for share in shares {
        share::check_tag(&share.tag)?;
        share::check_guest_path(share)?;
        share::check_allowlist(share)?;
        if !tags.insert(share.tag.as_str()) {
            return Err(FsError::DuplicateTag(share.tag.clone()));
        }
        if !guest_paths.insert(share.guest_path.as_path()) {
            return Err(FsError::DuplicateGuestPath(share.guest_path.clone()));
        }
    }
    Ok(())
}

/// File descriptors kept back for the VMM itself when shares divide `RLIMIT_NOFILE`.
pub const FD_RESERVE: u64 = 256;
/// Fewest descriptors one share may get (inodes plus handles).
pub const MIN_FDS_PER_SHARE: u64 = 64;

/// Raise this process's `RLIMIT_NOFILE` soft limit to its hard limit, then give each of
/// `shares` shares an equal part of it (after [`FD_RESERVE`] for the VMM), capped at the
/// default limits. Each inode the guest holds and each open handle is one host fd.
pub fn limits_within_fd_budget(shares: usize) -> Result<FsLimits, FsError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; raising soft to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    limits_for(shares, lim.rlim_cur)
}

/// [`limits_within_fd_budget`] for a given descriptor limit.
pub fn limits_for(shares: usize, fd_limit: u64) -> Result<FsLimits, FsError> {
    let defaults = FsLimits::default();
    let count = shares.max(1) as u64;
    let per_share = fd_limit.saturating_sub(FD_RESERVE) / count;
    if per_share < MIN_FDS_PER_SHARE {
        return Err(FsError::FdBudget {
            shares,
            needed: FD_RESERVE + MIN_FDS_PER_SHARE * count,
            limit: fd_limit,
        });
    }
    let max_handles = (defaults.max_handles as u64).min(per_share / 8).max(1);
    let max_inodes = (defaults.max_inodes as u64).min(per_share - max_handles);
    Ok(FsLimits {
        max_inodes: usize::try_from(max_inodes).unwrap_or(defaults.max_inodes),
        max_handles: usize::try_from(max_handles).unwrap_or(defaults.max_handles),
    })
}

/// The tag of the `index`th share: `mxcfs0`, `mxcfs1`, …
pub fn share_tag(index: usize) -> String {
    format!("mxcfs{index}")
}

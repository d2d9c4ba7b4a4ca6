//! The policy layer: fuse-backend-rs's `FileSystem` trait around `PassthroughFs`.
//!
//! Every trait method is written out here, so nothing reaches the passthrough by a default
//! implementation: an operation is either checked and delegated, or refused. The rules
//! (see the module documentation of [`crate::devices::fs`] for why):
//!
//! | operation | rule |
//! |---|---|
//! | lookup, readdir, readdirplus | denied names, denied inodes and other file systems are absent (`ENOENT`, left out of listings) |
//! | names in any request | empty, `.`, `..` or containing `/`: `EINVAL`; over 255 bytes: `ENAMETOOLONG` |
//! | node ids, handles | only those this layer handed out (else `EBADF`); handles only with their own node |
//! | setattr, write, fallocate, create, mknod, mkdir, symlink, link, unlink, rmdir, rename | `EROFS` on a read-only share |
//! | open | `EROFS` on a read-only share for write access or `O_TRUNC`; only regular files (`EISDIR`, `ELOOP`, `ENXIO`); flags reduced to a known set |
//! | access | `EROFS` for `W_OK` on a read-only share |
//! | create, mknod, mkdir, symlink, link, rename target | a denied name: `EACCES` (it cannot be created, and whether it exists is not said) |
//! | unlink, rmdir, rename source | a denied or hidden name: `ENOENT` |
//! | unlink, rmdir, rename source or target | a directory above a denied path: `EBUSY` (it may not move, or the rule would not follow it on the host) |
//! | modes (create, mknod, mkdir, setattr) | set-user-ID and set-group-ID bits removed; mknod only for regular files, FIFOs and sockets |
//! | creations | run with the server's own credentials (the guest's uid and gid are not adopted) |
//! | inodes held by the guest | at most `max_inodes` (`ENFILE`) |
//! | open files and directories | at most `max_handles` (`EMFILE`) |
//! | init | no writeback cache, no zero-message open, no DAX, no killpriv; big writes (1 MiB) |
//! | xattrs, locks, ioctl, poll, bmap, DAX mappings | `ENOSYS` (`ENOTTY` for ioctl) |
//! | destroy | releases every handle and inode the guest held (the passthrough's own destroy would re-import the root) |

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::share::{InodeId, PreparedShare};
use super::{FsError, FsLimits, WriteBudget};

/// The FUSE node id of a share's root.
pub const ROOT_ID: u64 = 1;
/// How long the guest may cache names and attributes. Short, so that a second sandbox or
/// the host sees a consistent tree soon after a change.
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest name the guest may use.
const NAME_MAX: usize = 255;

/// Options the server agrees to, whatever the guest offers.
const SERVED_OPTIONS: FsOptions = FsOptions::from_bits_truncate(
    FsOptions::ASYNC_READ.bits()
        | FsOptions::BIG_WRITES.bits()
        | FsOptions::MAX_PAGES.bits()
        | FsOptions::AUTO_INVAL_DATA.bits()
        | FsOptions::DO_READDIRPLUS.bits()
        | FsOptions::READDIRPLUS_AUTO.bits(),
);

/// Open flags passed on to the host (others are dropped: `O_CREAT`, `O_EXCL` outside
/// create, `O_PATH`, `O_TMPFILE`, `O_DIRECT`, `O_NOATIME`, `O_ASYNC`, …).
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_NONBLOCK
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_LARGEFILE;

/// Mode bits the guest may never set on the host.
const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

/// The context creations run with: uid and gid 0 tell the passthrough not to switch
/// credentials, so the worker thread's own identity is used.
const SERVER_CTX: Context = Context {
    uid: 0,
    gid: 0,
    pid: 0,
};

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// What a node id stands for.
#[derive(Debug, Clone, Copy)]
struct Known {
    refs: u64,
    id: InodeId,
    mode: u32,
}

impl Known {
    fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

#[derive(Debug, Clone, Copy)]
struct OpenHandle {
    inode: u64,
    dir: bool,
    /// The open flags the passthrough stored for it.
    flags: u32,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Known>,
    handles: HashMap<u64, OpenHandle>,
}

/// What a name in a directory is, for the guest.
enum NameState {
    Absent,
    /// It exists and the guest may see it; its mode and host inode.
    Visible(u32, InodeId),
    Denied,
}

/// A share's file system as the guest may see and change it.
pub struct PolicyFs {
    inner: PassthroughFs<()>,
    share: PreparedShare,
    limits: FsLimits,
    owner: Option<OwnerMap>,
    budget: Option<Arc<WriteBudget>>,
    state: Mutex<State>,
}

/// Files the server's own user owns are shown to the guest as owned by the guest's
/// command user: the guest kernel checks permissions against the owner it is shown
/// (virtiofs mounts with `default_permissions`), and that user may then change what the
/// server may change, as the server's own checks decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerMap {
    /// The server's uid and gid (its `RunAs`, else the VMM's own).
    pub host: (u32, u32),
    /// The guest uid and gid shown for them.
    pub guest: (u32, u32),
}

impl OwnerMap {
    fn present(&self, st: &mut stat64) {
        if st.st_uid == self.host.0 {
            st.st_uid = self.guest.0;
        }
        if st.st_gid == self.host.1 {
            st.st_gid = self.guest.1;
        }
    }
}

impl std::fmt::Debug for PolicyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyFs")
            .field("share", &self.share)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl PolicyFs {
    /// Open the share's root and set up the passthrough behind the policy.
    pub fn new(
        share: PreparedShare,
        limits: FsLimits,
        owner: Option<OwnerMap>,
    ) -> Result<Self, FsError> {
        let fs = Self::unimported(share, limits, owner)?;
        std::thread::scope(|scope| {
            scope.spawn(|| fs.import_root()).join().unwrap_or_else(|_| {
                Err(FsError::Worker(io::Error::other(
                    "importing the share root panicked",
                )))
            })
        })?;
        Ok(fs)
    }

    /// The passthrough behind the policy, its root not yet opened: serves nothing until
    /// [`PolicyFs::import_root`] has run.
    pub(super) fn unimported(
        share: PreparedShare,
        limits: FsLimits,
        owner: Option<OwnerMap>,
    ) -> Result<Self, FsError> {
        if limits.max_inodes == 0 || limits.max_handles == 0 {
            return Err(FsError::InvalidLimits {
                max_inodes: limits.max_inodes,
                max_handles: limits.max_handles,
            });
        }
        let root_dir = share
            .root
            .to_str()
            .ok_or_else(|| FsError::NonUtf8Path(share.root.clone()))?
            .to_owned();
        let cfg = Config {
            root_dir,
            // Import once, below, instead of on every guest INIT.
            do_import: false,
            xattr: false,
            writeback: false,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            inode_file_handles: false,
            cache_policy: CachePolicy::Auto,
            entry_timeout: CACHE_TIMEOUT,
            attr_timeout: CACHE_TIMEOUT,
            // Node ids derived from host inode numbers: the passthrough then forgets an
            // inode completely when the guest does. With its own counter it would keep an
            // id for every inode ever looked up, for as long as the VM runs.
            use_host_ino: true,
            allow_direct_io: false,
            ..Config::default()
        };
        let failed = |source| FsError::Passthrough {
            path: share.root.clone(),
            source,
        };
        let inner = PassthroughFs::<()>::new(cfg).map_err(failed)?;
        Ok(Self {
            inner,
            share,
            limits,
            owner,
            budget: None,
            state: Mutex::new(State::default()),
        })
    }

    /// Open the share's root in the passthrough and check it is the directory the share
    /// was prepared with. The calling thread first takes its own `fs_struct`
    /// (`unshare(CLONE_FS)`): the passthrough's import sets the umask to 0, which must not
    /// leak into the rest of the VMM. Run it on a thread of its own (a worker, or the
    /// short-lived one of [`PolicyFs::new`]).
    pub(super) fn import_root(&self) -> Result<(), FsError> {
        super::creds::own_fs_struct().map_err(FsError::Worker)?;
        let failed = |source| FsError::Passthrough {
            path: self.share.root.clone(),
            source,
        };
        self.inner.import().map_err(failed)?;
        let (st, _) = self
            .inner
            .getattr(&SERVER_CTX, ROOT_ID, None)
            .map_err(failed)?;
        if stat_id(&st) != self.share.root_id {
            return Err(FsError::RootChanged(self.share.root.clone()));
        }
        Ok(())
    }

    /// Writes, extensions and allocations take from `budget` first (`ENOSPC` past it).
    pub fn with_budget(mut self, budget: Option<Arc<WriteBudget>>) -> Self {
        self.budget = budget;
        self
    }

    /// Takes `n` bytes from the write budget, if there is one.
    fn take_budget(&self, n: u64) -> io::Result<()> {
        self.budget.as_ref().map_or(Ok(()), |b| b.take(n))
    }

    fn give_back_budget(&self, n: u64) {
        if let Some(b) = &self.budget {
            b.give_back(n);
        }
    }

    pub fn share(&self) -> &PreparedShare {
        &self.share
    }

    /// Node ids the guest holds (the root not counted).
    pub fn inode_count(&self) -> usize {
        self.state().map(|s| s.inodes.len()).unwrap_or(0)
    }

    /// Files and directories the guest has open.
    pub fn handle_count(&self) -> usize {
        self.state().map(|s| s.handles.len()).unwrap_or(0)
    }

    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| err(libc::EIO))
    }

    fn writable(&self) -> io::Result<()> {
        if self.share.readonly {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn known(&self, inode: u64) -> io::Result<Known> {
        if inode == ROOT_ID {
            return Ok(Known {
                refs: 1,
                id: self.share.root_id,
                mode: libc::S_IFDIR,
            });
        }
        self.state()?
            .inodes
            .get(&inode)
            .copied()
            .ok_or_else(|| err(libc::EBADF))
    }

    fn dir(&self, inode: u64) -> io::Result<Known> {
        let known = self.known(inode)?;
        if known.kind() == libc::S_IFDIR {
            Ok(known)
        } else {
            Err(err(libc::ENOTDIR))
        }
    }

    fn handle(&self, inode: u64, handle: u64, dir: bool) -> io::Result<OpenHandle> {
        self.state()?
            .handles
            .get(&handle)
            .copied()
            .filter(|h| h.inode == inode && h.dir == dir)
            .ok_or_else(|| err(libc::EBADF))
    }

    fn take_handle(&self, inode: u64, handle: u64, dir: bool) -> io::Result<()> {
        let mut state = self.state()?;
        match state.handles.get(&handle) {
            Some(h) if h.inode == inode && h.dir == dir => {
                state.handles.remove(&handle);
                Ok(())
            }
            _ => Err(err(libc::EBADF)),
        }
    }

    fn room_for_handle(&self) -> io::Result<()> {
        if self.state()?.handles.len() >= self.limits.max_handles {
            Err(err(libc::EMFILE))
        } else {
            Ok(())
        }
    }

    fn room_for_inode(&self) -> io::Result<()> {
        if self.state()?.inodes.len() >= self.limits.max_inodes {
            Err(err(libc::ENFILE))
        } else {
            Ok(())
        }
    }

    fn add_handle(&self, handle: u64, open: OpenHandle) -> io::Result<()> {
        self.state()?.handles.insert(handle, open);
        Ok(())
    }

    /// Whether an inode with these attributes is hidden from the guest.
    fn hidden(&self, st: &stat64) -> bool {
        !self.share.devices.contains(&st.st_dev) || self.share.denied.is_denied_inode(stat_id(st))
    }

    /// Count one more guest reference to `entry`'s node (not checking the policy).
    fn track(&self, entry: &Entry) -> io::Result<()> {
        if entry.inode == ROOT_ID {
            return Ok(());
        }
        let mut state = self.state()?;
        let full = state.inodes.len() >= self.limits.max_inodes;
        match state.inodes.get_mut(&entry.inode) {
            Some(known) => known.refs = known.refs.saturating_add(1),
            None if full => return Err(err(libc::ENFILE)),
            None => {
                state.inodes.insert(
                    entry.inode,
                    Known {
                        refs: 1,
                        id: stat_id(&entry.attr),
                        mode: entry.attr.st_mode,
                    },
                );
            }
        }
        Ok(())
    }

    /// Take back one reference counted by `track`, without telling the passthrough.
    fn untrack(&self, inode: u64) {
        if let Ok(mut state) = self.state() {
            if let Some(known) = state.inodes.get_mut(&inode) {
                known.refs -= 1;
                if known.refs == 0 {
                    state.inodes.remove(&inode);
                }
            }
        }
    }

    /// Hand `entry` (one passthrough reference) to the guest if the policy lets it see it;
    /// otherwise give the reference back.
    fn admit(&self, mut entry: Entry) -> io::Result<Entry> {
        let result = if self.hidden(&entry.attr) {
            Err(err(libc::ENOENT))
        } else {
            self.track(&entry)
        };
        match result {
            Ok(()) => {
                self.present(&mut entry.attr);
                Ok(entry)
            }
            Err(e) => {
                self.inner.forget(&SERVER_CTX, entry.inode, 1);
                Err(e)
            }
        }
    }

    /// The attributes as the guest is shown them (see [`OwnerMap`]).
    fn present(&self, st: &mut stat64) {
        if let Some(map) = &self.owner {
            map.present(st);
        }
    }

    /// What `name` in directory `parent` is for the guest. Looks it up on the host (and
    /// gives the reference back) unless its name alone is denied.
    fn name_state(&self, parent: u64, parent_id: InodeId, name: &CStr) -> io::Result<NameState> {
        if self.share.denied.is_denied_name(parent_id, name.to_bytes()) {
            return Ok(NameState::Denied);
        }
        match self.inner.lookup(&SERVER_CTX, parent, name) {
            Ok(entry) => {
                let hidden = self.hidden(&entry.attr);
                self.inner.forget(&SERVER_CTX, entry.inode, 1);
                Ok(if hidden {
                    NameState::Denied
                } else {
                    NameState::Visible(entry.attr.st_mode, stat_id(&entry.attr))
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(NameState::Absent),
            Err(e) => Err(e),
        }
    }

    /// Checks for a new name: the directory, the name, and that the name is not denied.
    /// Returns what is there now.
    fn creatable(&self, parent: u64, name: &CStr) -> io::Result<NameState> {
        let dir = self.dir(parent)?;
        check_name(name)?;
        match self.name_state(parent, dir.id, name)? {
            NameState::Denied => Err(err(libc::EACCES)),
            state => Ok(state),
        }
    }

    /// CREATE of a name that exists: look it up and open it, giving the reference back if
    /// the open fails.
    fn open_existing(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        flags: u32,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let entry = self.lookup(ctx, parent, name)?;
        match self.open(ctx, entry.inode, flags, 0) {
            Ok((handle, opts, _)) => Ok((entry, handle, opts, None)),
            Err(e) => {
                self.forget(ctx, entry.inode, 1);
                Err(e)
            }
        }
    }

    /// Checks for an existing name that will be removed or moved: visible, and not a
    /// directory above a denied path (`EBUSY`, as for a mount point).
    fn removable(&self, parent: u64, name: &CStr) -> io::Result<()> {
        let dir = self.dir(parent)?;
        check_name(name)?;
        match self.name_state(parent, dir.id, name)? {
            NameState::Visible(_, id) if self.share.denied.is_pinned(id) => Err(err(libc::EBUSY)),
            NameState::Visible(..) => Ok(()),
            NameState::Absent | NameState::Denied => Err(err(libc::ENOENT)),
        }
    }
}

fn stat_id(st: &stat64) -> InodeId {
    InodeId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// A single path component the guest may use.
fn check_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(err(libc::EINVAL));
    }
    if bytes.len() > NAME_MAX {
        return Err(err(libc::ENAMETOOLONG));
    }
    Ok(())
}

/// The open flags passed on to the host.
fn open_flags(flags: u32) -> io::Result<u32> {
    let flags = flags as i32;
    if flags & libc::O_ACCMODE == libc::O_ACCMODE {
        return Err(err(libc::EINVAL));
    }
    Ok((flags & OPEN_FLAGS) as u32)
}

fn wants_write(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl FileSystem for PolicyFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = self.inner.init(capable & SERVED_OPTIONS)?;
        Ok((want | SERVED_OPTIONS) & SERVED_OPTIONS)
    }

    fn destroy(&self) {
        let Ok(mut state) = self.state() else {
            return;
        };
        let handles = std::mem::take(&mut state.handles);
        let inodes = std::mem::take(&mut state.inodes);
        drop(state);
        for (handle, open) in handles {
            // Errors only mean the passthrough no longer had it.
            let _ = if open.dir {
                self.inner.releasedir(&SERVER_CTX, open.inode, 0, handle)
            } else {
                self.inner
                    .release(&SERVER_CTX, open.inode, 0, handle, false, false, None)
            };
        }
        for (inode, known) in inodes {
            self.inner.forget(&SERVER_CTX, inode, known.refs);
        }
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let dir = self.dir(parent)?;
        check_name(name)?;
        if self.share.denied.is_denied_name(dir.id, name.to_bytes()) {
            return Err(err(libc::ENOENT));
        }
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(entry)
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        if inode == ROOT_ID {
            return;
        }
        let taken = match self.state() {
            Ok(mut state) => match state.inodes.get_mut(&inode) {
                Some(known) => {
                    let n = count.min(known.refs);
                    known.refs -= n;
                    if known.refs == 0 {
                        state.inodes.remove(&inode);
                    }
                    n
                }
                None => 0,
            },
            Err(_) => 0,
        };
        if taken > 0 {
            self.inner.forget(&SERVER_CTX, inode, taken);
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let known = self.known(inode)?;
        if let Some(h) = handle {
            self.handle(inode, h, known.kind() == libc::S_IFDIR)?;
        }
        let (mut st, timeout) = self.inner.getattr(ctx, inode, handle)?;
        self.present(&mut st);
        Ok((st, timeout))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        let known = self.known(inode)?;
        if let Some(h) = handle {
            self.handle(inode, h, false)?;
        }
        if valid.contains(SetattrValid::SIZE) && known.kind() != libc::S_IFREG {
            return Err(err(if known.kind() == libc::S_IFDIR {
                libc::EISDIR
            } else {
                libc::EINVAL
            }));
        }
        let mut attr = attr;
        attr.st_mode &= !SET_ID_BITS;
        // Growing a file (truncate upwards) takes the growth from the write budget.
        let growth = match (&self.budget, valid.contains(SetattrValid::SIZE)) {
            (Some(_), true) => {
                let (now, _) = self.inner.getattr(&SERVER_CTX, inode, None)?;
                (attr.st_size.max(0) as u64).saturating_sub(now.st_size.max(0) as u64)
            }
            _ => 0,
        };
        self.take_budget(growth)?;
        let (mut st, timeout) = self
            .inner
            .setattr(ctx, inode, attr, handle, valid)
            .inspect_err(|_| self.give_back_budget(growth))?;
        self.present(&mut st);
        Ok((st, timeout))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.known(inode)?;
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        _ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.creatable(parent, name)?;
        self.room_for_inode()?;
        let entry = self.inner.symlink(&SERVER_CTX, linkname, parent, name)?;
        self.admit(entry)
    }

    fn mknod(
        &self,
        _ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        if !matches!(
            mode & libc::S_IFMT,
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK
        ) {
            return Err(err(libc::EPERM));
        }
        self.creatable(parent, name)?;
        self.room_for_inode()?;
        let entry = self
            .inner
            .mknod(&SERVER_CTX, parent, name, mode & !SET_ID_BITS, 0, umask)?;
        self.admit(entry)
    }

    fn mkdir(
        &self,
        _ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.creatable(parent, name)?;
        self.room_for_inode()?;
        let entry = self
            .inner
            .mkdir(&SERVER_CTX, parent, name, mode & !SET_ID_BITS, umask)?;
        self.admit(entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.removable(parent, name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.removable(parent, name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(err(libc::EINVAL));
        }
        self.removable(olddir, oldname)?;
        // The target is replaced (or, with RENAME_EXCHANGE, moved): a pinned one neither.
        if let NameState::Visible(_, id) = self.creatable(newdir, newname)? {
            if self.share.denied.is_pinned(id) {
                return Err(err(libc::EBUSY));
            }
        }
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        if self.known(inode)?.kind() == libc::S_IFDIR {
            return Err(err(libc::EPERM));
        }
        self.creatable(newparent, newname)?;
        let entry = self.inner.link(&SERVER_CTX, inode, newparent, newname)?;
        self.admit(entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let known = self.known(inode)?;
        match known.kind() {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(err(libc::EISDIR)),
            libc::S_IFLNK => return Err(err(libc::ELOOP)),
            _ => return Err(err(libc::ENXIO)),
        }
        let flags = open_flags(flags)?;
        if self.share.readonly && wants_write(flags) {
            return Err(err(libc::EROFS));
        }
        self.room_for_handle()?;
        let (handle, opts, _) = self.inner.open(ctx, inode, flags, 0)?;
        let handle = handle.ok_or_else(|| err(libc::EIO))?;
        self.add_handle(
            handle,
            OpenHandle {
                inode,
                dir: false,
                flags,
            },
        )?;
        Ok((Some(handle), opts, None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        let exclusive = args.flags & libc::O_EXCL as u32 != 0;
        match self.creatable(parent, name)? {
            NameState::Visible(..) if exclusive => return Err(err(libc::EEXIST)),
            NameState::Visible(mode, _) if mode & libc::S_IFMT == libc::S_IFDIR => {
                return Err(err(libc::EISDIR))
            }
            // An existing file is opened here rather than by the passthrough's create,
            // which keeps a lookup reference it never gives back when that open fails.
            NameState::Visible(..) => return self.open_existing(ctx, parent, name, args.flags),
            NameState::Absent | NameState::Denied => {}
        }
        self.room_for_inode()?;
        self.room_for_handle()?;
        // Exclusive: a name that appeared since the check above is not opened here.
        let flags = open_flags(args.flags)? | libc::O_EXCL as u32;
        let args = CreateIn {
            flags,
            mode: args.mode & !SET_ID_BITS,
            umask: args.umask,
            fuse_flags: 0,
        };
        let (entry, handle, opts, _) = self.inner.create(&SERVER_CTX, parent, name, args)?;
        let release = |h: Option<u64>| {
            if let Some(h) = h {
                let _ = self
                    .inner
                    .release(&SERVER_CTX, entry.inode, 0, h, false, false, None);
            }
        };
        let entry = match self.admit(entry) {
            Ok(entry) => entry,
            Err(e) => {
                release(handle);
                return Err(e);
            }
        };
        let Some(h) = handle else {
            return Err(err(libc::EIO));
        };
        let added = self.add_handle(
            h,
            OpenHandle {
                inode: entry.inode,
                dir: false,
                flags,
            },
        );
        if let Err(e) = added {
            release(handle);
            return Err(e);
        }
        Ok((entry, Some(h), opts, None))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let open = self.handle(inode, handle, false)?;
        self.inner
            .read(ctx, inode, handle, w, size, offset, None, open.flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let open = self.handle(inode, handle, false)?;
        self.take_budget(u64::from(size))?;
        let written = self.inner.write(
            ctx, inode, handle, r, size, offset, None, false, open.flags, 0,
        );
        let used = written.as_ref().map_or(0, |n| *n as u64);
        self.give_back_budget(u64::from(size).saturating_sub(used));
        written
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.handle(inode, handle, false)?;
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.handle(inode, handle, false)?;
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.handle(inode, handle, false)?;
        // Punching or collapsing frees space; every other mode may allocate `length`.
        let frees =
            mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) as u32 != 0;
        let cost = if frees { 0 } else { length };
        self.take_budget(cost)?;
        let result = self
            .inner
            .fallocate(ctx, inode, handle, mode, offset, length);
        if result.is_err() {
            self.give_back_budget(cost);
        }
        result
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.take_handle(inode, handle, false)?;
        self.inner
            .release(ctx, inode, flags, handle, false, false, None)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.known(inode)?;
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
    ) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _name: &CStr,
        _size: u32,
    ) -> io::Result<GetxattrReply> {
        Err(err(libc::ENOSYS))
    }

    fn listxattr(&self, _ctx: &Context, _inode: u64, _size: u32) -> io::Result<ListxattrReply> {
        Err(err(libc::ENOSYS))
    }

    fn removexattr(&self, _ctx: &Context, _inode: u64, _name: &CStr) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.dir(inode)?;
        self.room_for_handle()?;
        let flags = libc::O_RDONLY as u32;
        let (handle, opts) = self.inner.opendir(ctx, inode, flags)?;
        let handle = handle.ok_or_else(|| err(libc::EIO))?;
        self.add_handle(
            handle,
            OpenHandle {
                inode,
                dir: true,
                flags,
            },
        )?;
        Ok((Some(handle), opts))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.dir(inode)?;
        self.handle(inode, handle, true)?;
        // Listed through readdirplus so every entry's inode is known and can be checked;
        // the lookup reference each entry brings is given back at once.
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dirent, entry| {
                if self.hidden(&entry.attr) || self.share.denied.is_denied_name(dir.id, dirent.name)
                {
                    self.inner.forget(&SERVER_CTX, entry.inode, 1);
                    return Ok(1);
                }
                match add_entry(dirent) {
                    // Full: the passthrough gives the reference back itself.
                    Ok(0) => Ok(0),
                    other => {
                        self.inner.forget(&SERVER_CTX, entry.inode, 1);
                        other
                    }
                }
            })
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.dir(inode)?;
        self.handle(inode, handle, true)?;
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dirent, entry| {
                if self.hidden(&entry.attr) || self.share.denied.is_denied_name(dir.id, dirent.name)
                {
                    self.inner.forget(&SERVER_CTX, entry.inode, 1);
                    return Ok(1);
                }
                if let Err(e) = self.track(&entry) {
                    self.inner.forget(&SERVER_CTX, entry.inode, 1);
                    return Err(e);
                }
                let node = entry.inode;
                let mut entry = entry;
                self.present(&mut entry.attr);
                let added = add_entry(dirent, entry);
                match added {
                    Ok(n) if n > 0 => {}
                    // Full: the passthrough gives its reference back itself.
                    Ok(_) => self.untrack(node),
                    Err(_) => {
                        self.untrack(node);
                        self.inner.forget(&SERVER_CTX, node, 1);
                    }
                }
                added
            })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.handle(inode, handle, true)?;
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.take_handle(inode, handle, true)?;
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.known(inode)?;
        if self.share.readonly && mask as i32 & libc::W_OK != 0 {
            return Err(err(libc::EROFS));
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.handle(inode, handle, false)?;
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _owner: u64,
        _lock: FileLock,
        _flags: u32,
    ) -> io::Result<FileLock> {
        Err(err(libc::ENOSYS))
    }

    fn setlk(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _owner: u64,
        _lock: FileLock,
        _flags: u32,
    ) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn setlkw(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _owner: u64,
        _lock: FileLock,
        _flags: u32,
    ) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn ioctl(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _flags: u32,
        _cmd: u32,
        _data: IoctlData,
        _out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        Err(err(libc::ENOTTY))
    }

    fn bmap(&self, _ctx: &Context, _inode: u64, _block: u64, _blocksize: u32) -> io::Result<u64> {
        Err(err(libc::ENOSYS))
    }

    fn poll(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _khandle: u64,
        _flags: u32,
        _events: u32,
    ) -> io::Result<u32> {
        Err(err(libc::ENOSYS))
    }

    fn notify_reply(&self) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn id_remap(&self, _ctx: &mut Context) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        let names: [&[u8]; 7] = [b"", b".", b"..", b"a/b", b"/", b"ok", b"..."];

        let results: Vec<Option<i32>> = names
            .iter()
            .map(|n| {
                let c = std::ffi::CString::new(*n).unwrap();
                check_name(&c).err().and_then(|e| e.raw_os_error())
            })
            .collect();

        let long = std::ffi::CString::new(vec![b'x'; 256]).unwrap();
        assert_eq!(
            results,
            [
                Some(libc::EINVAL),
                Some(libc::EINVAL),
                Some(libc::EINVAL),
                Some(libc::EINVAL),
                Some(libc::EINVAL),
                None,
                None
            ]
        );
        assert_eq!(
            check_name(&long).unwrap_err().raw_os_error(),
            Some(libc::ENAMETOOLONG)
        );
    }

    #[test]
    fn open_flags_keep_only_known_bits() {
        let tmpfile = (libc::O_TMPFILE | libc::O_RDWR) as u32;
        let path = (libc::O_PATH | libc::O_RDONLY) as u32;
        let append = (libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT) as u32;

        let cleaned = [tmpfile, path, append].map(|f| open_flags(f).unwrap());

        assert_eq!(cleaned[0], libc::O_RDWR as u32);
        assert_eq!(cleaned[1], libc::O_RDONLY as u32);
        assert_eq!(cleaned[2], (libc::O_WRONLY | libc::O_APPEND) as u32);
        assert!(open_flags(libc::O_ACCMODE as u32).is_err());
        assert!(wants_write(libc::O_RDONLY as u32 | libc::O_TRUNC as u32));
        assert!(!wants_write(libc::O_RDONLY as u32));
    }
}

//! A small FUSE client over [`Guest`]: one method per operation, errors as positive errno.

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, AttrOut, BatchForgetIn, CreateIn, EntryOut, FlushIn, ForgetIn, ForgetOne, FsyncIn,
    GetattrIn, InitIn, InitOut, LinkIn, MkdirIn, MknodIn, OpenIn, OpenOut, ReadIn, ReleaseIn,
    Rename2In, RenameIn, SetattrIn, WriteIn, WriteOut,
};
use vm_memory_017::ByteValued;

use super::{Guest, Reply, HIPRIO};
use crate::devices::fs::protocol::opcode as op;

pub type FuseResult<T> = Result<T, i32>;

/// Room for any metadata reply.
const ROOM: u32 = 4096;

pub fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse<T: ByteValued>(reply: &Reply) -> FuseResult<T> {
    if reply.errno != 0 {
        return Err(reply.errno);
    }
    let size = std::mem::size_of::<T>();
    assert!(reply.body.len() >= size, "reply body too short: {reply:?}");
    Ok(*T::from_slice(&reply.body[..size]).unwrap())
}

fn status(reply: &Reply) -> FuseResult<()> {
    if reply.errno == 0 {
        Ok(())
    } else {
        Err(reply.errno)
    }
}

/// One directory entry from READDIR or READDIRPLUS.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub ino: u64,
    pub entry: Option<EntryOut>,
}

impl Guest {
    pub fn init(&mut self) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 36,
            max_readahead: 1 << 17,
            // ASYNC_READ | BIG_WRITES | DO_READDIRPLUS | READDIRPLUS_AUTO | WRITEBACK_CACHE |
            // MAX_PAGES: what Linux offers (writeback included) and more.
            flags: 0x1 | 0x20 | 0x2000 | 0x4000 | 0x1_0000 | 0x40_0000,
        };
        let reply = self.request(op::INIT, 0, &[init.as_slice()], ROOM);
        parse(&reply).unwrap()
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> FuseResult<EntryOut> {
        let reply = self.request(op::LOOKUP, parent, &[&cstr(name)], ROOM);
        parse(&reply)
    }

    pub fn forget(&mut self, node: u64, nlookup: u64) {
        let reply = self.request_on(
            HIPRIO,
            op::FORGET,
            node,
            &[ForgetIn { nlookup }.as_slice()],
            0,
        );
        assert_eq!(reply.used, 0);
    }

    pub fn batch_forget(&mut self, nodes: &[(u64, u64)]) {
        let mut body = BatchForgetIn {
            count: nodes.len() as u32,
            dummy: 0,
        }
        .as_slice()
        .to_vec();
        for (nodeid, nlookup) in nodes {
            body.extend_from_slice(
                ForgetOne {
                    nodeid: *nodeid,
                    nlookup: *nlookup,
                }
                .as_slice(),
            );
        }
        let reply = self.request_on(HIPRIO, op::BATCH_FORGET, 0, &[&body], 0);
        assert_eq!(reply.used, 0);
    }

    pub fn getattr(&mut self, node: u64) -> FuseResult<AttrOut> {
        let reply = self.request(op::GETATTR, node, &[GetattrIn::default().as_slice()], ROOM);
        parse(&reply)
    }

    pub fn setattr(&mut self, node: u64, attr: SetattrIn) -> FuseResult<AttrOut> {
        let reply = self.request(op::SETATTR, node, &[attr.as_slice()], ROOM);
        parse(&reply)
    }

    pub fn truncate(&mut self, node: u64, size: u64) -> FuseResult<AttrOut> {
        self.setattr(
            node,
            SetattrIn {
                valid: 1 << 3, // FATTR_SIZE
                size,
                ..Default::default()
            },
        )
    }

    pub fn chmod(&mut self, node: u64, mode: u32) -> FuseResult<AttrOut> {
        self.setattr(
            node,
            SetattrIn {
                valid: 1, // FATTR_MODE
                mode,
                ..Default::default()
            },
        )
    }

    pub fn set_mtime(&mut self, node: u64, mtime: u64) -> FuseResult<AttrOut> {
        self.setattr(
            node,
            SetattrIn {
                valid: 1 << 5, // FATTR_MTIME
                mtime,
                ..Default::default()
            },
        )
    }

    pub fn readlink(&mut self, node: u64) -> FuseResult<Vec<u8>> {
        let reply = self.request(op::READLINK, node, &[], ROOM);
        status(&reply).map(|()| reply.body)
    }

    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> FuseResult<EntryOut> {
        let mut body = cstr(name);
        body.extend_from_slice(&cstr(target));
        let reply = self.request(op::SYMLINK, parent, &[&body], ROOM);
        parse(&reply)
    }

    pub fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> FuseResult<EntryOut> {
        let args = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let reply = self.request(op::MKNOD, parent, &[args.as_slice(), &cstr(name)], ROOM);
        parse(&reply)
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> FuseResult<EntryOut> {
        let args = MkdirIn { mode, umask: 0 };
        let reply = self.request(op::MKDIR, parent, &[args.as_slice(), &cstr(name)], ROOM);
        parse(&reply)
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> FuseResult<()> {
        let reply = self.request(op::UNLINK, parent, &[&cstr(name)], ROOM);
        status(&reply)
    }

    pub fn rmdir(&mut self, parent: u64, name: &str) -> FuseResult<()> {
        let reply = self.request(op::RMDIR, parent, &[&cstr(name)], ROOM);
        status(&reply)
    }

    pub fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> FuseResult<()> {
        let mut names = cstr(old);
        names.extend_from_slice(&cstr(new));
        let args = RenameIn { newdir };
        let reply = self.request(op::RENAME, olddir, &[args.as_slice(), &names], ROOM);
        status(&reply)
    }

    pub fn rename2(
        &mut self,
        olddir: u64,
        old: &str,
        newdir: u64,
        new: &str,
        flags: u32,
    ) -> FuseResult<()> {
        let mut names = cstr(old);
        names.extend_from_slice(&cstr(new));
        let args = Rename2In {
            newdir,
            flags,
            padding: 0,
        };
        let reply = self.request(op::RENAME2, olddir, &[args.as_slice(), &names], ROOM);
        status(&reply)
    }

    pub fn link(&mut self, node: u64, newparent: u64, name: &str) -> FuseResult<EntryOut> {
        let args = LinkIn { oldnodeid: node };
        let reply = self.request(op::LINK, newparent, &[args.as_slice(), &cstr(name)], ROOM);
        parse(&reply)
    }

    pub fn open(&mut self, node: u64, flags: i32) -> FuseResult<u64> {
        let args = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let reply = self.request(op::OPEN, node, &[args.as_slice()], ROOM);
        parse::<OpenOut>(&reply).map(|o| o.fh)
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: i32,
        mode: u32,
    ) -> FuseResult<(EntryOut, u64)> {
        let args = CreateIn {
            flags: flags as u32,
            mode,
            umask: 0o022,
            fuse_flags: 0,
        };
        let reply = self.request(op::CREATE, parent, &[args.as_slice(), &cstr(name)], ROOM);
        let entry: EntryOut = parse(&reply)?;
        let size = std::mem::size_of::<EntryOut>();
        let open = OpenOut::from_slice(&reply.body[size..size + 16]).unwrap();
        Ok((entry, open.fh))
    }

    pub fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> FuseResult<Vec<u8>> {
        let args = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let reply = self.request(op::READ, node, &[args.as_slice()], 16 + size);
        status(&reply).map(|()| reply.body)
    }

    pub fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> FuseResult<u32> {
        let args = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        // Header and WriteIn in one descriptor, the data in another, as Linux sends it.
        let reply = self.request(op::WRITE, node, &[args.as_slice(), data], ROOM);
        parse::<WriteOut>(&reply).map(|w| w.size)
    }

    pub fn flush(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let args = FlushIn {
            fh,
            ..Default::default()
        };
        let reply = self.request(op::FLUSH, node, &[args.as_slice()], ROOM);
        status(&reply)
    }

    pub fn fsync(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let args = FsyncIn {
            fh,
            ..Default::default()
        };
        let reply = self.request(op::FSYNC, node, &[args.as_slice()], ROOM);
        status(&reply)
    }

    pub fn release(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let args = ReleaseIn {
            fh,
            ..Default::default()
        };
        let reply = self.request(op::RELEASE, node, &[args.as_slice()], ROOM);
        status(&reply)
    }

    pub fn opendir(&mut self, node: u64) -> FuseResult<u64> {
        let args = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let reply = self.request(op::OPENDIR, node, &[args.as_slice()], ROOM);
        parse::<OpenOut>(&reply).map(|o| o.fh)
    }

    pub fn releasedir(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let args = ReleaseIn {
            fh,
            ..Default::default()
        };
        let reply = self.request(op::RELEASEDIR, node, &[args.as_slice()], ROOM);
        status(&reply)
    }

    /// Every entry of a directory, READDIR(PLUS) after READDIR(PLUS) until the end.
    pub fn list(&mut self, node: u64, plus: bool) -> FuseResult<Vec<Listed>> {
        let fh = self.opendir(node)?;
        let mut all = Vec::new();
        let mut offset = 0u64;
        loop {
            let args = ReadIn {
                fh,
                offset,
                size: 4096,
                ..Default::default()
            };
            let opcode = if plus { op::READDIRPLUS } else { op::READDIR };
            let reply = self.request(opcode, node, &[args.as_slice()], 16 + 4096);
            status(&reply)?;
            if reply.body.is_empty() {
                break;
            }
            let (batch, last_off) = parse_dirents(&reply.body, plus);
            all.extend(batch);
            offset = last_off;
        }
        self.releasedir(node, fh)?;
        Ok(all)
    }

    pub fn access(&mut self, node: u64, mask: i32) -> FuseResult<()> {
        let args = AccessIn {
            mask: mask as u32,
            padding: 0,
        };
        let reply = self.request(op::ACCESS, node, &[args.as_slice()], ROOM);
        status(&reply)
    }

    pub fn statfs(&mut self, node: u64) -> FuseResult<Vec<u8>> {
        let reply = self.request(op::STATFS, node, &[], ROOM);
        status(&reply).map(|()| reply.body)
    }

    pub fn fallocate(&mut self, node: u64, fh: u64, length: u64) -> FuseResult<()> {
        let mut args = Vec::new();
        args.extend_from_slice(&fh.to_le_bytes());
        args.extend_from_slice(&0u64.to_le_bytes()); // offset
        args.extend_from_slice(&length.to_le_bytes());
        args.extend_from_slice(&0u32.to_le_bytes()); // mode
        args.extend_from_slice(&0u32.to_le_bytes()); // padding
        let reply = self.request(op::FALLOCATE, node, &[&args], ROOM);
        status(&reply)
    }

    /// Read a whole file through OPEN/READ/RELEASE in `chunk`-byte reads.
    pub fn read_file(&mut self, node: u64, chunk: u32) -> FuseResult<Vec<u8>> {
        let fh = self.open(node, libc::O_RDONLY)?;
        let mut data = Vec::new();
        loop {
            let part = self.read(node, fh, data.len() as u64, chunk)?;
            if part.is_empty() {
                break;
            }
            data.extend_from_slice(&part);
        }
        self.release(node, fh)?;
        Ok(data)
    }
}

/// Decode a READDIR(PLUS) reply body: the entries and the offset to continue from.
pub fn parse_dirents(mut body: &[u8], plus: bool) -> (Vec<Listed>, u64) {
    let mut out = Vec::new();
    let mut last_off = 0;
    let entry_size = std::mem::size_of::<EntryOut>();
    while !body.is_empty() {
        let entry = if plus {
            let e = *EntryOut::from_slice(&body[..entry_size]).unwrap();
            body = &body[entry_size..];
            Some(e)
        } else {
            None
        };
        let ino = u64::from_le_bytes(body[0..8].try_into().unwrap());
        let off = u64::from_le_bytes(body[8..16].try_into().unwrap());
        let namelen = u32::from_le_bytes(body[16..20].try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(&body[24..24 + namelen]).into_owned();
        let padded = (24 + namelen + 7) & !7;
        body = &body[padded.min(body.len())..];
        last_off = off;
        out.push(Listed { name, ino, entry });
    }
    (out, last_off)
}

//! Checks on a FUSE request before the FUSE server sees it.
//!
//! The Linux virtio-fs driver puts a request in one descriptor chain: the device-readable
//! part holds the `fuse_in_header` and the arguments, the device-writable part has room for
//! the `fuse_out_header` and the reply. The device only hands the FUSE server requests that
//! are well formed at this level:
//! - the readable part holds at least a header, and the header's `len` is exactly the
//!   readable length (the server sizes its buffers from `len`);
//! - neither part is longer than the largest request or reply the device negotiates
//!   (1 MiB of data plus 4 KiB), so no guest-supplied size makes the server allocate more;
//! - the opcode is one the device serves; everything else is answered `ENOSYS` here
//!   (extended attributes, locks, ioctl, poll, bmap, DAX mappings, copy_file_range, notify
//!   replies, and numbers that are not opcodes at all);
//! - a request that needs a reply has room for at least the reply header.
//!
//! What is wrong but answerable gets an error reply; what cannot be answered (no header, no
//! room, or a request that never gets a reply) is returned to the guest unanswered.

/// Size of `fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// The largest request or reply, in bytes: 1 MiB of data (`max_write` and `max_pages` the
/// server negotiates) plus room for headers.
pub const MAX_MESSAGE_LEN: usize = (1 << 20) + 4096;

/// FUSE opcodes the device names.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
}

/// The fields of `fuse_in_header` the device looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(raw: &[u8; IN_HEADER_LEN]) -> Self {
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(raw.get(i..i + 4).unwrap_or(&[0; 4]));
            u32::from_le_bytes(b)
        };
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(raw.get(i..i + 8).unwrap_or(&[0; 8]));
            u64::from_le_bytes(b)
        };
        Self {
            len: u32_at(0),
            opcode: u32_at(4),
            unique: u64_at(8),
            nodeid: u64_at(16),
        }
    }
}

/// How the device treats an opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// Served; the guest waits for a reply.
    Reply,
    /// Served; the guest expects no reply (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
    /// Not served: answered `ENOSYS`.
    Unsupported,
}

pub fn classify(op: u32) -> OpClass {
    use opcode::*;
    match op {
        FORGET | BATCH_FORGET | INTERRUPT => OpClass::NoReply,
        LOOKUP | GETATTR | SETATTR | READLINK | SYMLINK | MKNOD | MKDIR | UNLINK | RMDIR
        | RENAME | LINK | OPEN | READ | WRITE | STATFS | RELEASE | FSYNC | FLUSH | INIT
        | OPENDIR | READDIR | RELEASEDIR | FSYNCDIR | ACCESS | CREATE | DESTROY | FALLOCATE
        | READDIRPLUS | RENAME2 | LSEEK => OpClass::Reply,
        _ => OpClass::Unsupported,
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the FUSE server.
    Serve,
    /// Answer with this (positive) errno without serving it.
    Reply(i32),
    /// Return the chain to the guest with nothing written.
    Drop,
}

/// The verdict on a request whose chain has `readable` and `writable` bytes and whose
/// header is `hdr` (`None`: fewer than [`IN_HEADER_LEN`] readable bytes).
pub fn check(hdr: Option<&InHeader>, readable: usize, writable: usize) -> Verdict {
    let Some(hdr) = hdr else {
        return Verdict::Drop;
    };
    let class = classify(hdr.opcode);
    let can_reply = class != OpClass::NoReply && writable >= OUT_HEADER_LEN;
    let refuse = |errno| {
        if can_reply {
            Verdict::Reply(errno)
        } else {
            Verdict::Drop
        }
    };
    if hdr.len as usize != readable || readable > MAX_MESSAGE_LEN || writable > MAX_MESSAGE_LEN {
        return refuse(libc::EINVAL);
    }
    match class {
        OpClass::Unsupported => refuse(libc::ENOSYS),
        OpClass::Reply if !can_reply => Verdict::Drop,
        OpClass::Reply | OpClass::NoReply => Verdict::Serve,
    }
}

/// A `fuse_out_header` carrying `-errno` (0: success, no payload) for request `unique`.
pub fn error_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut out = [0u8; OUT_HEADER_LEN];
    let (len, rest) = out.split_at_mut(4);
    len.copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    let (error, id) = rest.split_at_mut(4);
    error.copy_from_slice(&errno.wrapping_neg().to_le_bytes());
    id.copy_from_slice(&unique.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: u32, op: u32) -> InHeader {
        InHeader {
            len,
            opcode: op,
            unique: 9,
            nodeid: 1,
        }
    }

    #[test]
    fn header_fields_are_little_endian_at_their_offsets() {
        let mut raw = [0u8; IN_HEADER_LEN];
        raw[0..4].copy_from_slice(&56u32.to_le_bytes());
        raw[4..8].copy_from_slice(&15u32.to_le_bytes());
        raw[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        raw[16..24].copy_from_slice(&77u64.to_le_bytes());

        let parsed = InHeader::parse(&raw);

        assert_eq!(
            parsed,
            InHeader {
                len: 56,
                opcode: 15,
                unique: 0x0102_0304_0506_0708,
                nodeid: 77
            }
        );
    }

    #[test]
    fn verdicts() {
        let big = MAX_MESSAGE_LEN + 1;
        let cases = [
            (None, 10, 100, Verdict::Drop),
            (
                Some(hdr(40, opcode::GETATTR)),
                56,
                100,
                Verdict::Reply(libc::EINVAL),
            ),
            (Some(hdr(56, opcode::GETATTR)), 56, 100, Verdict::Serve),
            (Some(hdr(56, opcode::GETATTR)), 56, 15, Verdict::Drop),
            (
                Some(hdr(56, opcode::GETATTR)),
                56,
                big,
                Verdict::Reply(libc::EINVAL),
            ),
            (
                Some(hdr(big as u32, opcode::WRITE)),
                big,
                16,
                Verdict::Reply(libc::EINVAL),
            ),
            (Some(hdr(48, opcode::FORGET)), 48, 0, Verdict::Serve),
            (Some(hdr(40, opcode::FORGET)), 48, 0, Verdict::Drop),
            (
                Some(hdr(64, opcode::GETXATTR)),
                64,
                100,
                Verdict::Reply(libc::ENOSYS),
            ),
            (Some(hdr(64, 7)), 64, 100, Verdict::Reply(libc::ENOSYS)),
            (
                Some(hdr(64, u32::MAX)),
                64,
                100,
                Verdict::Reply(libc::ENOSYS),
            ),
            (Some(hdr(64, opcode::SETUPMAPPING)), 64, 0, Verdict::Drop),
        ];

        let got: Vec<Verdict> = cases
            .iter()
            .map(|(h, r, w, _)| check(h.as_ref(), *r, *w))
            .collect();

        let want: Vec<Verdict> = cases.iter().map(|c| c.3).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn error_reply_layout() {
        let out = error_reply(0xabcd, libc::ENOSYS);

        assert_eq!(&out[0..4], &16u32.to_le_bytes());
        assert_eq!(&out[4..8], &(-libc::ENOSYS).to_le_bytes());
        assert_eq!(&out[8..16], &0xabcdu64.to_le_bytes());
    }
}
